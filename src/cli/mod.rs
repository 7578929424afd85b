//! Command line: clap types and one small function per verb.
//!
//! Exit codes ([`EXIT_CODES`], also in the README): 0 = done, 1 = the operation failed,
//! 2 = bad usage or a refused request, 3 = tqproxy is not running / not reachable, and 4 to 8
//! for the kinds of failure a script may want to tell apart ([`ErrorKind::exit_code`]): the
//! kind comes over the control socket with the failure, never from its text.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

mod certs;
mod check_json;
mod drain;

use crate::config::{Config, Strategy};
use crate::control::{ControlRequest, ControlResponse, call};
use crate::status::{ErrorKind, Outcome};

mod generate;
mod logs;
mod top;

/// The exit codes of every verb, for `--help` (the README's CLI section has the same table).
pub const EXIT_CODES: &str = "\
Exit codes:
  0  done: the change fully applied
  1  the operation failed (the reason is printed); `check`: the configuration is invalid
  2  bad usage, or a request tqproxy refused as invalid
  3  cannot reach tqproxy (not running: no socket, connection refused)
  4  no such worker
  5  the worker is busy with another change (or already exists); try again
  6  tqproxy is shutting down
  7  the configuration on disk is invalid; nothing changed
  8  nothing to roll back to
  9  no canary deploy running (promote, abort)";

#[derive(Debug, Parser)]
#[command(
    name = "tqproxy",
    version,
    about = "HTTP front end and process manager for worker processes",
    after_help = EXIT_CODES
)]
pub struct Cli {
    /// The global configuration file (relative paths inside it resolve against its directory).
    #[arg(
        short,
        long,
        global = true,
        env = "TQPROXY_CONFIG",
        default_value = "conf/tqproxy.yaml"
    )]
    pub config: PathBuf,
    /// Talk to this control socket instead of the one named in the configuration.
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Print the result as JSON instead of text (every verb that prints one; `logs`: one
    /// object per line).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the proxy and every worker (foreground).
    Run {
        /// Development: watch worker.yaml files and programs, rebuild and roll on change.
        #[arg(long)]
        watch: bool,
        /// Internal (used by `tqproxy upgrade`): take over from the tqproxy with this pid.
        #[arg(long, hide = true)]
        upgrade_from: Option<u32>,
    },
    /// Replace the running tqproxy by a new binary without dropping a connection.
    ///
    /// The new process starts its own instances, takes over the listening sockets once they
    /// are ready, and the old process drains and stops.
    Upgrade {
        /// The new tqproxy binary (default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// How long to wait for the handover.
        #[arg(long, default_value = "180s", value_parser = parse_duration_arg)]
        timeout: Duration,
    },
    /// Validate the configuration and every worker.yaml; exit 0 or 1. Workers without a
    /// memory or CPU limit, or running as root, get a warning.
    Check {
        /// Treat the warnings as errors (exit 1).
        #[arg(long)]
        strict: bool,
    },
    /// Show workers and instances (`--json`: the status document, as `/status.json`).
    Status {
        /// Show only this worker.
        worker: Option<String>,
    },
    /// Read a worker's log (its rotated files too, oldest first), or the access log.
    ///
    /// Each line carries its time, instance (`#3`), generation (`g2`) and stream (`out`,
    /// `err`, or `tqproxy` for tqproxy's own lines about the instance). Read from the files in
    /// `logs_dir`: tqproxy need not be running.
    Logs {
        /// The worker whose log to read.
        #[arg(required_unless_present = "access")]
        worker: Option<String>,
        /// The access log (`log.access_log`) instead of a worker's.
        #[arg(long, conflicts_with_all = ["worker", "instance", "since"])]
        access: bool,
        /// Only the lines of this instance (the number after `#`).
        #[arg(long, value_name = "N")]
        instance: Option<u64>,
        /// Keep printing lines as they are written, across rotation, until interrupted.
        #[arg(short, long)]
        follow: bool,
        /// Only the last LINES lines (default: all; 10 with --follow).
        #[arg(short = 'n', long, value_name = "LINES")]
        lines: Option<usize>,
        /// Only lines written in this last stretch of time (`10m`, `2h`, `30s`).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
        since: Option<Duration>,
    },
    /// A live view of every worker and instance, refreshed from the control socket.
    ///
    /// Keys: ↑/↓ select a worker, + and - scale it, r restarts it, l shows the tail of its
    /// log, q (or Esc, Ctrl-C) quits.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value = "1s", value_parser = parse_duration_arg)]
        interval: Duration,
    },
    /// Set the number of instances of a worker.
    Scale {
        /// The worker to scale.
        worker: String,
        /// How many instances it should run (0 stops it but keeps it configured).
        instances: u32,
    },
    /// Rolling restart of a worker with its current configuration.
    Restart {
        /// The worker to restart.
        worker: String,
    },
    /// Deploy a worker's configuration from disk as a new generation.
    Deploy {
        /// The worker to deploy (its worker.yaml is read again).
        worker: String,
        /// How to replace the instances this once: rolling, bluegreen or canary (default:
        /// the worker's `deploy.strategy`).
        #[arg(long, value_parser = parse_strategy)]
        strategy: Option<Strategy>,
        /// A canary deploy this once (`--strategy canary`), with the worker's `deploy.canary`
        /// steps and limits.
        #[arg(long, conflicts_with = "strategy")]
        canary: bool,
    },
    /// Skip the remaining steps of a worker's canary deploy: the new generation takes 100 %.
    Promote {
        /// The worker whose canary to promote.
        worker: String,
    },
    /// Roll a worker's canary deploy back now: the old generation keeps serving.
    Abort {
        /// The worker whose canary to abort.
        worker: String,
    },
    /// Switch back to the previous generation of a worker.
    Rollback {
        /// The worker to roll back.
        worker: String,
    },
    /// Re-read every configuration file and apply the differences.
    Reload,
    /// Print a shell completion script (`source <(tqproxy completions bash)`; the package
    /// installs all three).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: generate::Shell,
    },
    /// Internal (packaging): write the man pages, tqproxy.1 and one per verb, into DIR.
    #[command(hide = true)]
    Man {
        /// The directory to write them into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// List the ACME certificates (domains, issuer, expiry, next renewal); `certs renew
    /// DOMAIN` renews one now.
    Certs {
        #[command(subcommand)]
        action: Option<certs::CertsAction>,
    },
    /// Take this node out of its load balancer's rotation: /healthz answers 503 `draining`,
    /// responses carry `Connection: close` (HTTP/2: GOAWAY), new connections are still served.
    /// Returns once no request is in flight (exit 0) or at the timeout (exit 1).
    Drain {
        /// How long to wait for the requests in flight (the node stays drained after it).
        #[arg(long, default_value = "30s", value_parser = parse_duration_arg)]
        timeout: Duration,
    },
    /// Put the node back into rotation (undo `drain`).
    Undrain,
    /// Stop gracefully: drain requests, stop every instance, exit.
    Stop {
        /// How long to wait for tqproxy to exit.
        #[arg(long, default_value = "120s", value_parser = parse_duration_arg)]
        timeout: Duration,
    },
}

fn parse_strategy(s: &str) -> Result<Strategy, String> {
    match s {
        "rolling" => Ok(Strategy::Rolling),
        "bluegreen" => Ok(Strategy::Bluegreen),
        "canary" => Ok(Strategy::Canary),
        _ => Err(format!(
            "`{s}` is not a strategy (rolling, bluegreen or canary)"
        )),
    }
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    crate::config::parse_duration(s)
}

/// Runs the parsed command; returns the exit code.
pub fn dispatch(mut cli: Cli) -> i32 {
    cli.config = generate::default_config(cli.config);
    if cli.json && matches!(cli.command, Command::Run { .. } | Command::Top { .. }) {
        eprintln!("--json: `run` and `top` print no result to format");
        return 2;
    }
    if !matches!(cli.command, Command::Run { .. }) {
        // A closed pipe (`tqproxy status | head`) ends a client verb quietly.
        crate::sandbox::default_sigpipe();
    }
    match cli.command {
        Command::Run {
            watch,
            upgrade_from,
        } => {
            let opts = crate::server::RunOptions {
                watch,
                upgrade_from,
            };
            match crate::server::run(&cli.config, opts) {
                // A stop that outlasted pingora's grace period exits 0 too: the stop was asked for.
                Ok(_stopped) => 0,
                Err(e) => {
                    eprintln!("{e}");
                    1
                }
            }
        }
        Command::Upgrade {
            ref binary,
            timeout,
        } => upgrade(&cli, binary.as_deref(), timeout, cli.json),
        Command::Check { strict } => check(&cli.config, strict, cli.json),
        Command::Logs {
            ref worker,
            access,
            instance,
            follow,
            lines,
            since,
        } => logs::run(
            &cli.config,
            logs::LogsArgs {
                worker: worker.clone(),
                access,
                instance,
                follow,
                lines,
                since,
                json: cli.json,
            },
        ),
        Command::Top { interval } => match client_setup(&cli) {
            Ok((socket, rt)) => top::run(&cli.config, &socket, rt, interval),
            Err(code) => code,
        },
        Command::Completions { shell } => generate::completions(shell),
        Command::Man { ref out } => generate::man(out),
        Command::Drain { timeout } => drain::run(&cli, Some(timeout)),
        Command::Undrain => drain::run(&cli, None),
        ref other => {
            let (socket, rt) = match client_setup(&cli) {
                Ok(x) => x,
                Err(code) => return code,
            };
            rt.block_on(client(other, &socket, cli.json))
        }
    }
}

/// What every client verb needs: the control socket (from `--socket` or the configuration)
/// and a small runtime. `Err` is the exit code, the reason already printed.
fn client_setup(cli: &Cli) -> Result<(PathBuf, tokio::runtime::Runtime), i32> {
    let socket = match &cli.socket {
        Some(s) => s.clone(),
        None => Config::control_socket_of(&cli.config).map_err(|e| {
            eprintln!("{e}");
            3
        })?,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("cannot start runtime: {e}");
            1
        })?;
    Ok((socket, rt))
}

/// Prints `v` as JSON (pretty); 1 when it cannot be serialised.
fn print_json<T: serde::Serialize>(v: &T) -> i32 {
    match serde_json::to_string_pretty(v) {
        Ok(s) => {
            use std::io::Write;
            // A closed pipe (`| head`) is no failure of the verb.
            let _ = writeln!(std::io::stdout().lock(), "{s}");
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// `tqproxy check` (`--json`: [`check_json`]).
fn check(path: &Path, strict: bool, json: bool) -> i32 {
    if json {
        return check_json::run(path, strict);
    }
    match Config::load(path) {
        Ok(c) => {
            let problems = crate::config::check_workers(&c);
            if !problems.is_empty() {
                for p in problems {
                    eprintln!("{p}");
                }
                return 1;
            }
            let advice = crate::config::advice(&c);
            for a in &advice {
                eprintln!("{a}");
            }
            if strict && !advice.is_empty() {
                eprintln!(
                    "{}: {} warning{} (--strict)",
                    c.file.display(),
                    advice.len(),
                    if advice.len() == 1 { "" } else { "s" }
                );
                return 1;
            }
            println!(
                "{}: ok ({} worker{}: {})",
                c.file.display(),
                c.workers.len(),
                if c.workers.len() == 1 { "" } else { "s" },
                c.workers.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// Whether a process exists and has not exited (a zombie waiting for its parent has exited).
fn running(pid: nix::unistd::Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => nix::sys::signal::kill(pid, None).is_ok(),
    }
}

/// `tqproxy upgrade`: ask the running tqproxy to start the new binary in upgrade mode (so it
/// stays in the same service/cgroup), then wait until it has taken over and the old one exited.
fn upgrade(cli: &Cli, binary: Option<&Path>, timeout: Duration, json: bool) -> i32 {
    // The new process will read the same files: refuse early if they are broken.
    if let Err(e) = Config::load(&cli.config) {
        eprintln!("configuration invalid, nothing changed:\n{e}");
        return ErrorKind::InvalidConfig.exit_code();
    }
    let (socket, rt) = match client_setup(cli) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let exe = match binary {
        Some(b) => crate::config::absolute(b),
        None => match std::env::current_exe() {
            Ok(p) => p,
            Err(e) => {
                eprintln!("cannot find this binary: {e}");
                return 1;
            }
        },
    };
    let ask = |req: ControlRequest| rt.block_on(call(&socket, &req, Duration::from_secs(10)));
    // An error answer or a failed call is printed, and is the verb's exit code.
    let answer = |req: ControlRequest| match ask(req) {
        Ok(ControlResponse::Error { message, kind }) => {
            eprintln!("error: {message}");
            Err(kind.exit_code())
        }
        Ok(r) => Ok(r),
        Err(e) => {
            eprintln!("{e}");
            Err(e.exit_code())
        }
    };
    let old = match answer(ControlRequest::Ping {}) {
        Ok(ControlResponse::Pong { pid, .. }) => pid,
        Ok(other) => {
            eprintln!("unexpected response: {other:?}");
            return 1;
        }
        Err(code) => return code,
    };
    let started = Instant::now();
    let (new, log) = match answer(ControlRequest::Upgrade {
        binary: exe.clone(),
    }) {
        Ok(ControlResponse::Upgrading { pid, log }) => (pid, log),
        Ok(other) => {
            eprintln!("unexpected response: {other:?}");
            return 1;
        }
        Err(code) => return code,
    };
    if !json {
        println!(
            "started {} (pid {new}); its output goes to {}",
            exe.display(),
            log.display()
        );
    }
    let old_pid = nix::unistd::Pid::from_raw(old as i32);
    let new_pid = nix::unistd::Pid::from_raw(new as i32);
    loop {
        if !running(new_pid) {
            eprintln!(
                "the new tqproxy (pid {new}) exited before taking over; pid {old} keeps serving (see {})",
                log.display()
            );
            return 1;
        }
        if !running(old_pid)
            && let Ok(ControlResponse::Pong { pid, .. }) = ask(ControlRequest::Ping {})
            && pid == new
        {
            let ms = started.elapsed().as_millis();
            if json {
                return print_json(&serde_json::json!({
                    "old_pid": old, "new_pid": new, "ms": ms as u64, "log": log,
                }));
            }
            println!("upgraded: pid {old} → {new} in {ms} ms");
            return 0;
        }
        if started.elapsed() > timeout {
            eprintln!(
                "the handover did not finish within {}",
                humantime::format_duration(timeout)
            );
            return 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The exit code of a verb answered with `o`: 0 when it fully applied, else the exit code of
/// the first failed line's kind (1 for a failure without a kind).
fn outcome_exit_code(o: &Outcome) -> i32 {
    if o.ok {
        return 0;
    }
    o.first_failure()
        .and_then(|l| l.kind)
        .map_or(1, ErrorKind::exit_code)
}

fn print_outcome(o: &Outcome, json: bool) -> i32 {
    if json {
        let code = print_json(o);
        return if code != 0 {
            code
        } else {
            outcome_exit_code(o)
        };
    }
    for l in &o.lines {
        let mark = if l.ok { "ok" } else { "FAILED" };
        if l.worker == "-" {
            println!("{mark}: {}", l.message);
        } else {
            println!("{}: {mark}: {}", l.worker, l.message);
        }
    }
    outcome_exit_code(o)
}

async fn client(cmd: &Command, socket: &Path, json: bool) -> i32 {
    // Deploys wait for readiness and draining, which the server bounds itself.
    let long = Duration::from_secs(3600);
    let (req, timeout) = match &cmd {
        Command::Status { .. } => (ControlRequest::Status {}, Duration::from_secs(10)),
        Command::Scale { worker, instances } => (
            ControlRequest::Scale {
                worker: worker.clone(),
                instances: *instances,
            },
            long,
        ),
        Command::Restart { worker } => (
            ControlRequest::Restart {
                worker: worker.clone(),
            },
            long,
        ),
        Command::Deploy {
            worker,
            strategy,
            canary,
        } => (
            ControlRequest::Deploy {
                worker: worker.clone(),
                strategy: if *canary {
                    Some(Strategy::Canary)
                } else {
                    *strategy
                },
            },
            long,
        ),
        Command::Promote { worker } => (
            ControlRequest::Promote {
                worker: worker.clone(),
            },
            Duration::from_secs(10),
        ),
        Command::Abort { worker } => (
            ControlRequest::Abort {
                worker: worker.clone(),
            },
            Duration::from_secs(10),
        ),
        Command::Rollback { worker } => (
            ControlRequest::Rollback {
                worker: worker.clone(),
            },
            long,
        ),
        Command::Reload => (ControlRequest::Reload {}, long),
        Command::Certs { action, .. } => certs::request(action.as_ref()),
        Command::Stop { .. } => (ControlRequest::Stop {}, Duration::from_secs(10)),
        Command::Run { .. }
        | Command::Check { .. }
        | Command::Upgrade { .. }
        | Command::Completions { .. }
        | Command::Man { .. }
        | Command::Logs { .. }
        | Command::Top { .. }
        | Command::Drain { .. }
        | Command::Undrain => {
            unreachable!("handled by dispatch")
        }
    };
    let resp = match call(socket, &req, timeout).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return e.exit_code();
        }
    };
    match (cmd, resp) {
        (Command::Status { worker }, ControlResponse::Status(mut st)) => {
            if let Some(name) = worker {
                st.workers.retain(|w| &w.name == name);
                if st.workers.is_empty() {
                    eprintln!("error: no worker named `{name}`");
                    return ErrorKind::NoSuchWorker.exit_code();
                }
            }
            if json {
                print_json(&st)
            } else {
                print!("{}", st.render_table());
                0
            }
        }
        (Command::Certs { .. }, ControlResponse::Status(st)) => certs::print(&st, json),
        (Command::Stop { timeout }, ControlResponse::Stopping { pid }) => {
            let started = Instant::now();
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            while running(pid) {
                if started.elapsed() > *timeout {
                    eprintln!(
                        "tqproxy (pid {pid}) is still running after {}",
                        humantime::format_duration(*timeout)
                    );
                    return 1;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let ms = started.elapsed().as_millis();
            if json {
                return print_json(
                    &serde_json::json!({ "stopped_pid": pid.as_raw(), "ms": ms as u64 }),
                );
            }
            println!("stopped (pid {pid}) in {ms} ms");
            0
        }
        (_, ControlResponse::Outcome(o)) => print_outcome(&o, json),
        (_, ControlResponse::Error { message, kind }) => {
            eprintln!("error: {message}");
            kind.exit_code()
        }
        (_, other) => {
            eprintln!("unexpected response: {other:?}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::parse_response;

    /// The exit code of the answer `json`, as the CLI reads it from the socket.
    fn exit_code_of(json: &str) -> i32 {
        match parse_response(json.as_bytes()).unwrap() {
            ControlResponse::Outcome(o) => outcome_exit_code(&o),
            ControlResponse::Error { kind, .. } => kind.exit_code(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_outcome_exits_with_its_first_failed_lines_kind() {
        let outcome = |lines: &str| {
            let ok = !lines.contains(r#""ok":false"#);
            exit_code_of(&format!(
                r#"{{"type":"outcome","ok":{ok},"lines":[{lines}]}}"#
            ))
        };
        assert_eq!(outcome(r#"{"worker":"w","ok":true,"message":"scaled"}"#), 0);
        assert_eq!(
            outcome(
                r#"{"worker":"a","ok":true,"message":"kept"},
                   {"worker":"w","ok":false,"message":"no worker named `w`","kind":"no_such_worker"},
                   {"worker":"b","ok":false,"message":"busy","kind":"busy"}"#
            ),
            4
        );
        assert_eq!(
            outcome(r#"{"worker":"w","ok":false,"message":"m","kind":"busy"}"#),
            5
        );
        assert_eq!(
            outcome(r#"{"worker":"-","ok":false,"message":"m","kind":"invalid_config"}"#),
            7
        );
        // A failure without a kind (an older tqproxy, or a line such as "listen changed"):
        // 1, even when a later line has one.
        assert_eq!(
            outcome(
                r#"{"worker":"-","ok":false,"message":"listen changed"},
                   {"worker":"w","ok":false,"message":"m","kind":"busy"}"#
            ),
            1
        );
        assert_eq!(outcome(r#"{"worker":"w","ok":false,"message":"m"}"#), 1);
    }

    #[test]
    fn an_error_response_exits_with_its_kind() {
        let error = |kind: &str| {
            exit_code_of(&format!(
                r#"{{"type":"error","message":"m"{}}}"#,
                if kind.is_empty() {
                    String::new()
                } else {
                    format!(r#","kind":"{kind}""#)
                }
            ))
        };
        assert_eq!(error("bad_request"), 2);
        assert_eq!(error("no_such_worker"), 4);
        assert_eq!(error("shutting_down"), 6);
        assert_eq!(error("start_failed"), 1);
        // An older tqproxy's error without a kind: a failure, 1.
        assert_eq!(error(""), 1);
    }

    /// Every verb, argument and option says what it is for in `--help`.
    #[test]
    fn every_argument_has_help() {
        use clap::CommandFactory;
        fn walk(
            cmd: &clap::Command,
            path: &str,
            missing: &mut Vec<String>,
            seen: &mut Vec<String>,
        ) {
            if cmd.is_hide_set() {
                return;
            }
            if cmd.get_about().is_none() && !path.is_empty() {
                missing.push(format!("`{path}`"));
            }
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if a.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                seen.push(format!("{path} {id}"));
                if a.get_help().is_none() {
                    missing.push(format!("`{path} {id}`"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(
                        sub,
                        format!("{path} {}", sub.get_name()).trim(),
                        missing,
                        seen,
                    );
                }
            }
        }
        let (mut missing, mut seen) = (Vec::new(), Vec::new());
        let mut cli = Cli::command();
        // Global options are copied into every verb by `build`.
        cli.build();
        walk(&cli, "", &mut missing, &mut seen);
        // The walk reached the verbs' own arguments and the global ones in each.
        for want in [
            "scale instances",
            "logs lines",
            "deploy strategy",
            "status json",
        ] {
            assert!(seen.iter().any(|s| s == want), "{want} not seen: {seen:?}");
        }
        assert!(
            missing.is_empty(),
            "without help text: {}",
            missing.join(", ")
        );
    }

    #[test]
    fn the_help_lists_every_exit_code() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        let listed: Vec<i32> = help
            .lines()
            .skip_while(|l| !l.starts_with("Exit codes:"))
            .skip(1)
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        assert_eq!(listed, (0..=9).collect::<Vec<_>>(), "{help}");
        for kind in ErrorKind::ALL {
            assert!(listed.contains(&kind.exit_code()), "{kind:?}");
        }
    }
}
