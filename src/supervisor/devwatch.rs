//! `tqproxy run --watch`: development hot reload.
//!
//! Watches every worker's `worker.yaml`, its program file and its `build.watch` sources (and the
//! workers directory, for new workers). Changes are debounced; changed sources run the
//! worker's `build` command first (a failed build leaves the old instances serving and logs
//! why); then a reload rolls whatever changed — unchanged workers are untouched.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{Request, SupervisorHandle};
use crate::config::WorkerConfig;

/// Quiet time after the last change before acting (a compiler writes a binary in pieces).
const DEBOUNCE: Duration = Duration::from_millis(60);

pub async fn run(h: SupervisorHandle) {
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let mut watcher =
        match notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res
                && matches!(
                    ev.kind,
                    EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
                )
            {
                for p in ev.paths {
                    let _ = tx.send(p);
                }
            }
        }) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "--watch: cannot watch files");
                return;
            }
        };
    let mut watched: HashSet<(PathBuf, bool)> = HashSet::new();
    tracing::info!("--watch: watching worker configurations, programs and build sources");
    loop {
        let Some(config) = h.config().await else {
            return;
        };
        // What to watch now (the set changes when workers come and go).
        let mut want: HashSet<(PathBuf, bool)> = HashSet::new();
        want.insert((config.workers_dir.clone(), false));
        for w in config.workers.values() {
            want.insert((w.dir.clone(), false));
            if let Some(d) = w.program.parent() {
                want.insert((d.to_path_buf(), false));
            }
            if let Some(b) = &w.build {
                for p in &b.watch {
                    want.insert((p.clone(), true));
                }
            }
        }
        for (p, rec) in watched.difference(&want) {
            let _ = watcher.unwatch(p);
            let _ = rec;
        }
        for (p, rec) in want.difference(&watched) {
            let mode = if *rec {
                RecursiveMode::Recursive
            } else {
                RecursiveMode::NonRecursive
            };
            if let Err(e) = watcher.watch(p, mode) {
                tracing::warn!(path = %p.display(), error = %e, "--watch: cannot watch");
            }
        }
        watched = want;

        let Some(first) = rx.recv().await else { return };
        let t0 = Instant::now();
        let mut changed = vec![first];
        while let Ok(Some(p)) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {
            changed.push(p);
        }
        let mut relevant = changed
            .iter()
            .any(|p| p.parent() == Some(config.workers_dir.as_path()) && p.is_dir());
        let mut builds: BTreeMap<String, &WorkerConfig> = BTreeMap::new();
        for w in config.workers.values() {
            for p in &changed {
                if p == &w.file || p == &w.program {
                    relevant = true;
                }
                if let Some(b) = &w.build
                    && b.watch.iter().any(|s| p.starts_with(s))
                {
                    builds.insert(w.name.clone(), w);
                }
            }
        }
        // New worker.yaml files of workers not yet known.
        if changed
            .iter()
            .any(|p| p.file_name().is_some_and(|n| n == "worker.yaml"))
        {
            relevant = true;
        }
        let mut failed_builds = Vec::new();
        for (name, w) in builds {
            match build(w).await {
                Ok(ms) => {
                    tracing::info!(worker = %name, ms, "--watch: build succeeded");
                    relevant = true;
                }
                Err(e) => {
                    tracing::error!(worker = %name, "--watch: build failed, the running instances keep serving: {e}");
                    failed_builds.push(name);
                }
            }
        }
        if !relevant {
            continue;
        }
        let outcome = h.request(Request::Reload).await;
        for l in &outcome.lines {
            if l.ok {
                tracing::info!(worker = %l.worker, ms = t0.elapsed().as_millis() as u64, "--watch: {}", l.message);
            } else {
                tracing::error!(worker = %l.worker, "--watch: {}", l.message);
            }
        }
        // Drain events our own reload caused (none expected, but never loop on them).
        while rx.try_recv().is_ok() {}
    }
}

/// Runs the worker's build command in its directory; `Err` carries the tail of its output.
async fn build(w: &WorkerConfig) -> Result<u128, String> {
    let Some(b) = &w.build else { return Ok(0) };
    let Some((prog, args)) = b.command.split_first() else {
        return Ok(0);
    };
    let t = Instant::now();
    let mut cmd = tokio::process::Command::new(resolve(&w.dir, prog));
    cmd.args(args).current_dir(&w.dir).kill_on_drop(true);
    let out = match tokio::time::timeout(b.timeout, cmd.output()).await {
        Err(_) => {
            return Err(format!(
                "timed out after {}",
                humantime::format_duration(b.timeout)
            ));
        }
        Ok(Err(e)) => return Err(format!("cannot run {prog}: {e}")),
        Ok(Ok(o)) => o,
    };
    if out.status.success() {
        return Ok(t.elapsed().as_millis());
    }
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let tail: Vec<&str> = text.lines().rev().take(8).collect();
    Err(format!(
        "{} ({}): {}",
        b.command.join(" "),
        out.status,
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    ))
}

fn resolve(dir: &Path, prog: &str) -> PathBuf {
    if prog.contains('/') {
        dir.join(prog)
    } else {
        PathBuf::from(prog)
    }
}
