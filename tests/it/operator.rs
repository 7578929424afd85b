//! The operator's tools: `tqproxy logs` (rotated files in order, following across rotation),
//! `tqproxy top` under a real tmux, `status WORKER`, `--json` on the verbs, and the status
//! page's CPU and latency figures compared with `status --json` under load.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Env, Load, TQPROXY, WorkerDef, free_port, wait_for};

/// A `tqproxy` CLI child process (`logs -f`), killed by its pid when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn lines_of(out: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(out)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn logs_reads_rotated_files_in_order_and_follows_across_rotation() {
    let mut env = Env::with_global(
        &[WorkerDef::backend("w", "[\"/\"]", 1, "")],
        "log: { worker_log_max_size: 2K, worker_log_keep: 20 }\n",
    );
    env.start();
    // Each restart writes a few lines (start, ready, exit, ~600 bytes): restart until the
    // log has rotated twice (bounded).
    let logs = env.dir.path().join("logs");
    for _ in 0..30 {
        if logs.join("w.log.2").exists() {
            break;
        }
        env.ok(&["restart", "w"]);
    }
    wait_for(
        "the worker log rotated twice",
        Duration::from_secs(5),
        || logs.join("w.log.2").exists().then_some(()),
    );
    let all = lines_of(&env.cli(&["logs", "w"]).stdout);
    assert!(all.len() > 20, "{all:?}");
    // Oldest first across files: times never go back, and every line names its instance
    // and generation.
    let mut last = String::new();
    for l in &all {
        let time = l.split(' ').next().unwrap().to_string();
        assert!(time >= last, "out of order at {l}:\n{}", all.join("\n"));
        last = time;
        let tags: Vec<&str> = l.split(' ').skip(1).take(2).collect();
        assert!(
            tags[0].starts_with('#') && tags[1].starts_with('g'),
            "no instance/generation in {l}"
        );
        assert!(!l.contains(" g? "), "{l}");
    }
    // The first line is the oldest rotated file's first.
    let oldest =
        crate::harness::wait_for("the oldest rotated file", Duration::from_secs(1), || {
            (1..=20)
                .rev()
                .map(|n| logs.join(format!("w.log.{n}")))
                .find(|p| p.exists())
        });
    let first_of = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_string()
    };
    let head = first_of(&oldest);
    assert!(
        all[0].starts_with(head.split('|').next().unwrap()),
        "{} vs {head}",
        all[0]
    );
    // -n: the last lines of all of it.
    let last = lines_of(env.ok(&["logs", "w", "-n", "3"]).as_bytes());
    assert_eq!(last, all[all.len() - 3..]);
    // --instance keeps one instance.
    let id = env.instances("w")[0].id;
    let mine = lines_of(
        env.ok(&["logs", "w", "--instance", &id.to_string()])
            .as_bytes(),
    );
    assert!(!mine.is_empty());
    assert!(
        mine.iter().all(|l| l.contains(&format!(" #{id} g"))),
        "{mine:?}"
    );
    // --json: one object per line.
    let json = env.ok(&["logs", "w", "-n", "2", "--json"]);
    for l in json.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["instance"].is_u64() && v["generation"].is_u64(), "{l}");
    }
    // Bad input: an unknown worker (4, as for the other verbs), a bad --since (2).
    let o = env.cli(&["logs", "nope"]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("no worker named `nope`"));
    let o = env.cli(&["logs", "w", "--since", "ten minutes"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--since"),
        "{o:?}"
    );
    let o = env.cli(&["logs", "w", "--since", "1h"]);
    assert!(o.status.success() && !o.stdout.is_empty(), "{o:?}");

    // -f: follows while the file rotates under it (restarts write past 2K several times).
    let out = env.dir.path().join("follow.out");
    let child = Command::new(TQPROXY)
        .arg("-c")
        .arg(env.conf())
        .args(["logs", "w", "-f", "-n", "0"])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _follow = Running(child);
    let rotated_before = std::fs::metadata(logs.join("w.log"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    let ino = || {
        std::fs::metadata(logs.join("w.log"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap()
    };
    // Restarts until the file rotated under the follower, then two more (bounded).
    let mut after = 0;
    for _ in 0..30 {
        env.ok(&["restart", "w"]);
        if ino() != rotated_before {
            after += 1;
            if after == 2 {
                break;
            }
        }
    }
    assert_ne!(rotated_before, ino(), "the log should have rotated");
    let last_ready = env.instances("w")[0].id;
    wait_for(
        "`logs -f` prints the last instance's ready line, written after rotations",
        Duration::from_secs(10),
        || {
            let s = std::fs::read_to_string(&out).unwrap_or_default();
            s.contains(&format!("#{last_ready} g1 tqproxy| ready after"))
                .then_some(())
        },
    );
    // What was followed is exactly what was written since: the tail of the files, no line
    // twice, none missing.
    let followed = lines_of(&std::fs::read(&out).unwrap());
    let all = lines_of(&env.cli(&["logs", "w"]).stdout);
    let tail = &all[all.len() - followed.len()..];
    assert_eq!(followed, tail, "followed:\n{}", followed.join("\n"));
    assert!(followed.len() >= 12, "{followed:?}");
}

#[test]
fn logs_of_the_access_log() {
    let mut env = Env::with_global(
        &[WorkerDef::backend("w", "[\"/\"]", 1, "")],
        "log: { access_log: ../logs/access.log }\n",
    );
    env.start();
    for _ in 0..3 {
        assert_eq!(env.get("/").status, 200);
    }
    let lines = wait_for("3 access log lines", Duration::from_secs(5), || {
        let l = lines_of(&env.cli(&["logs", "--access"]).stdout);
        (l.len() == 3).then_some(l)
    });
    assert!(
        lines.iter().all(|l| l.contains("\"GET / HTTP/1.1\" 200")),
        "{lines:?}"
    );
    assert_eq!(
        lines_of(env.ok(&["logs", "--access", "-n", "1"]).as_bytes()).len(),
        1
    );
    // Without an access log configured: a clear error.
    let mut bare = Env::new(&[WorkerDef::backend("w", "[\"/\"]", 1, "")]);
    bare.start();
    let o = bare.cli(&["logs", "--access"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no access log is configured"),
        "{o:?}"
    );
}

#[test]
fn status_of_one_worker_and_json_on_the_verbs() {
    let mut env = Env::new(&[
        WorkerDef::backend("a", "[\"/a\"]", 1, ""),
        WorkerDef::backend("b", "[\"/b\"]", 1, ""),
    ]);
    env.start();
    let t = env.ok(&["status", "b"]);
    assert!(
        t.contains("\nb  routes /b") && !t.contains("\na  routes"),
        "{t}"
    );
    let doc: serde_json::Value = serde_json::from_str(&env.ok(&["status", "a", "--json"])).unwrap();
    let names: Vec<&str> = doc["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a"]);
    let o = env.cli(&["status", "nope"]);
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    // A verb's outcome as JSON, and its exit code kept.
    let out: serde_json::Value =
        serde_json::from_str(&env.ok(&["scale", "a", "2", "--json"])).unwrap();
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["lines"][0]["worker"], "a");
    let o = env.cli(&["restart", "nope", "--json"]);
    assert_eq!(o.status.code(), Some(4));
    let check: serde_json::Value = serde_json::from_str(&env.ok(&["check", "--json"])).unwrap();
    assert_eq!(check["ok"], true);
    assert_eq!(check["workers"], serde_json::json!(["a", "b"]));
}

/// A tmux server of our own (its own socket name), killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux is installed (scripts/deps.sh --test)")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    fn wait_screen(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what} never showed; the screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The instance rows (`  #<id> ...`) on a `top` screen.
fn instance_rows(screen: &str) -> usize {
    screen
        .lines()
        .filter(|l| l.trim_start().starts_with('#') && l.starts_with("  #"))
        .count()
}

#[test]
fn top_shows_a_worker_follows_a_scale_and_quits_on_q() {
    let mut env = Env::new(&[WorkerDef::backend("web", "[\"/\"]", 1, "")]);
    env.start();
    let tmux = Tmux {
        socket: format!("tqproxy-it-top-{}", std::process::id()),
    };
    let rc = env.dir.path().join("top.rc");
    let cmd = format!(
        "{TQPROXY} -c {} top --interval 300ms; echo $? > {}; sleep 60",
        env.conf().display(),
        rc.display()
    );
    let o = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "200",
        "-y",
        "50",
        &cmd,
    ]);
    assert!(o.status.success(), "tmux: {o:?}");
    let s = tmux.wait_screen("the worker `web` with its ready instance", |s| {
        s.contains("WORKER") && s.contains("web") && s.contains("ready serving")
    });
    assert_eq!(instance_rows(&s), 1, "{s}");
    assert!(s.contains("1/1 ready"), "{s}");

    // A scale done elsewhere (the CLI) shows up.
    env.ok(&["scale", "web", "3"]);
    tmux.wait_screen("3 ready instances after `tqproxy scale web 3`", |s| {
        instance_rows(s) == 3 && s.contains("3/3 ready")
    });
    // And one done from top: `-` scales down by one.
    tmux.run(&["send-keys", "-t", "top", "-"]);
    tmux.wait_screen("the answer to `-` and 2 instances", |s| {
        s.contains("scale web 2: ok") && s.contains("2/2 ready") && instance_rows(s) == 2
    });
    assert_eq!(env.worker("web").desired, 2);
    // Requests: the worker's row gets its p50/p99.
    for _ in 0..5 {
        assert_eq!(env.get("/").status, 200);
    }
    tmux.wait_screen("p50/p99 on the worker's row", |s| {
        s.lines()
            .find(|l| l.starts_with("web "))
            .is_some_and(|l| l.matches("ms").count() == 2)
    });
    // `l`: the log pane with the worker's last lines.
    tmux.run(&["send-keys", "-t", "top", "l"]);
    tmux.wait_screen("the log pane", |s| {
        s.contains("log of web") && s.contains("tqproxy| ready after")
    });
    // `q` quits with 0, and the terminal is given back (the alternate screen left).
    tmux.run(&["send-keys", "-t", "top", "q"]);
    let code = wait_for("top exited after q", Duration::from_secs(10), || {
        std::fs::read_to_string(&rc).ok().filter(|s| !s.is_empty())
    });
    assert_eq!(code.trim(), "0");
    let s = tmux.screen();
    assert!(!s.contains("WORKER"), "the screen was not restored:\n{s}");
    // With tqproxy not running: exit 3 before touching the terminal.
    env.stop(Duration::from_secs(20));
    let mut child = Command::new(TQPROXY)
        .arg("-c")
        .arg(env.conf())
        .arg("top")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for("top without tqproxy exits", Duration::from_secs(10), || {
        child.try_wait().unwrap()
    });
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(3), "{err}");
}

/// The status page's CPU under load: what the page shows is the document's `cpu_percent`,
/// and that agrees with the growth of `cpu_seconds` in `status --json` (the page showed 0 %
/// while `cpu_seconds` grew). Also the page shows p50/p99 per worker and both generations
/// during a blue/green window.
#[test]
fn status_page_cpu_agrees_with_status_json_under_load() {
    let browser = crate::observability::browser::Browser::launch();
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut env = Env::with_global(
        &[WorkerDef::backend(
            "w",
            "[\"/\"]",
            2,
            "deploy: { strategy: bluegreen, rollback_window: 60s }\n",
        )],
        &format!("control: {{ admin: \"{admin}\" }}\n"),
    );
    env.start();
    let load = Load::start(env.listen, "/", 8);
    load.wait_progress(500);
    let mut page = browser.page();
    page.navigate(&format!("http://{admin}/status"));

    // The growth of cpu_seconds between two `status --json` documents, in % of a core,
    // summed over the worker's instances (those in both documents).
    let json_rate = || {
        let a = env.status();
        let t0 = Instant::now();
        wait_for("two seconds of load", Duration::from_secs(5), || {
            (t0.elapsed() >= Duration::from_secs(2)).then_some(())
        });
        let b = env.status();
        let dt = b.uptime_secs - a.uptime_secs;
        let mut cpu = 0.0;
        for i in &b.workers[0].instances {
            if let Some(before) = a.workers[0].instances.iter().find(|x| x.pid == i.pid) {
                cpu += i.cpu_seconds.unwrap_or(0.0) - before.cpu_seconds.unwrap_or(0.0);
            }
        }
        cpu / dt * 100.0
    };
    // What the page shows, and the figures of the document it rendered (`prev`), read in
    // one evaluation.
    let shown = r#"(() => { try { return JSON.stringify({
        cells: [...document.querySelectorAll('[data-worker="w"] td[data-label="cpu"]')].map(t => t.textContent),
        card: document.querySelectorAll('[data-worker="w"] .spark .v')[2].textContent,
        doc: prev.workers[0].instances.map(i => i.cpu_percent),
        latency: document.querySelector('[data-worker="w"] [data-latency]')?.textContent ?? null,
    }); } catch (e) { return null; } })()"#;
    let (page_total, rate) = wait_for(
        "the page's cpu shown for both instances and close to status --json",
        Duration::from_secs(40),
        || {
            let v: serde_json::Value = serde_json::from_str(page.eval(shown).as_str()?).ok()?;
            let cells: Vec<String> = serde_json::from_value(v["cells"].clone()).ok()?;
            let doc: Vec<Option<f64>> = serde_json::from_value(v["doc"].clone()).ok()?;
            if cells.len() != 2 || doc.iter().any(|d| d.is_none()) {
                return None;
            }
            // The cells are the document's figures, rounded.
            let want: Vec<String> = doc.iter().map(|d| format!("{:.0}%", d.unwrap())).collect();
            assert_eq!(cells, want, "{v}");
            assert!(
                v["latency"].as_str().is_some_and(|l| l.contains("p99")),
                "{v}"
            );
            let total: f64 = doc.iter().map(|d| d.unwrap()).sum();
            let rate = json_rate();
            // Under load both figures are well above 0 and measure the same thing over
            // different seconds: agree within a factor of 2 (the first second of load, still
            // ramping up, may not; the next reading is taken).
            (rate > 2.0 && total > rate / 2.0 && total < rate * 2.0).then_some((total, rate))
        },
    );
    eprintln!("page cpu {page_total:.1}% (sum of instances), status --json {rate:.1}%");

    // Two generations: a blue/green deploy keeps the old one as standby; the page shows
    // both, each with its figures, and `status` too.
    env.ok(&["deploy", "w"]);
    wait_for(
        "both generations on the page",
        Duration::from_secs(30),
        || {
            let n = page
                .eval(r#"document.querySelectorAll('[data-worker="w"] [data-generation]').length"#);
            (n == 2).then_some(())
        },
    );
    let g = page.eval(r#"[...document.querySelectorAll('[data-worker="w"] [data-generation]')].map(e => e.textContent).join(" | ")"#);
    let g = g.as_str().unwrap();
    assert!(g.contains("g1: 2 inst") && g.contains("g2: 2 inst"), "{g}");
    let t = env.ok(&["status", "w"]);
    assert!(
        t.contains("  g1: 2 instances") && t.contains("  g2: 2 instances"),
        "{t}"
    );
    load.finish_without_failures("load during the page test");
    assert!(
        page.errors.is_empty(),
        "the page logged errors: {:?}",
        page.errors
    );
}
