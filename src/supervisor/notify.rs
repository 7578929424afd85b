//! `ready: notify`: the systemd sd_notify protocol, one unix datagram socket per instance
//! process.
//!
//! tqproxy binds `<run_dir>/notify/<tqproxy pid>/<worker>.<id>.<epoch>.sock` before the spawn
//! and gives its path to the instance as `NOTIFY_SOCKET` (with `watchdog:`, also
//! `WATCHDOG_USEC`). The instance sends datagrams of `KEY=VALUE` lines, as to systemd:
//!
//! | line | what tqproxy does |
//! |---|---|
//! | `READY=1` | the instance is ready: routed at once, no health poll (liveness checks follow as configured) |
//! | `STATUS=<text>` | shown in `status` (one line, at most [`MAX_STATUS`] characters) |
//! | `STOPPING=1` | it is going down: out of the route table at once, replaced, stopped (what an unhealthy report does) |
//! | `WATCHDOG=1` | with `watchdog:`, a ping: no ping for that long once ready replaces the instance |
//! | `WATCHDOG=trigger` | the instance asks to be treated as hung: replaced now |
//! | anything else systemd knows (`RELOADING`, `MAINPID`, `ERRNO`, `FDSTORE`, …) | ignored, logged once per key |
//!
//! Everything received is input from a process that may be broken or hostile, and is bounded:
//! a datagram is at most [`MAX_DATAGRAM`] bytes (larger ones are dropped, not truncated and
//! read); at most [`RATE`] datagrams a second are read per instance (beyond that tqproxy stops
//! reading until the budget refills, and the kernel's queue makes the sender wait or fail);
//! the sender's pid (SO_PASSCRED: the kernel's, not what the sender claims, unless it has
//! CAP_SYS_ADMIN) must be the instance's process or one of its session (the sandbox helper
//! makes the instance a session leader); no file descriptor is ever accepted (the control
//! buffer only has room for the credentials, so the kernel installs none). A malformed line is
//! logged (rate-limited) and skipped, never a panic; the rest of the datagram still counts.
//!
//! The directories are mode 0711 (reachable, not listable); the socket is 0600 and owned by the
//! instance's user (`sandbox.user`, `dynamic_user`), so another worker's user cannot even send
//! to it. Inside a mount namespace the supervisor hides every entry of `run_dir` but `notify/`
//! (instead of `run_dir` as a whole) so that the path resolves there too (`spec.rs`). Landlock
//! (ABI 7 as handled here) does not restrict connecting to a named unix socket.

use std::io::{self, IoSliceMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, sockopt};
use tokio::io::Interest;

/// The largest datagram read (systemd reads as much; sd_notify messages are a few lines).
pub const MAX_DATAGRAM: usize = 4096;
/// Datagrams read per second per instance (the burst is the same number).
pub const RATE: u32 = 200;
/// The longest `STATUS=` kept, in characters (longer ones are cut, with `…`).
pub const MAX_STATUS: usize = 200;
/// Log lines about bad input per instance per second (the rest are counted and summed up).
const LOG_RATE: u32 = 5;

/// Where the notify sockets of all tqproxy processes using `run_dir` live.
pub fn base_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("notify")
}

/// The notify directory of the tqproxy process `pid`.
pub fn process_dir(run_dir: &Path, pid: u32) -> PathBuf {
    base_dir(run_dir).join(pid.to_string())
}

/// One message of a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Ready,
    Stopping,
    Watchdog,
    WatchdogTrigger,
    Status(String),
    /// A key systemd knows and tqproxy does not act on.
    Ignored(String),
}

/// What one datagram said: its messages in order, and what was wrong with it (one entry per
/// bad line).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    pub messages: Vec<Message>,
    pub problems: Vec<String>,
}

/// Keys of the sd_notify protocol tqproxy accepts and ignores.
const IGNORED: &[&str] = &[
    "RELOADING",
    "MONOTONIC_USEC",
    "MAINPID",
    "ERRNO",
    "BUSERROR",
    "EXIT_STATUS",
    "EXTEND_TIMEOUT_USEC",
    "WATCHDOG_USEC",
    "FDSTORE",
    "FDSTOREREMOVE",
    "FDNAME",
    "FDPOLL",
    "BARRIER",
    "NOTIFYACCESS",
];

/// Parses one datagram: `KEY=VALUE` lines separated by `\n` (an empty line, a trailing
/// newline and a `\r` before it are fine). Never panics; every bad line is a problem that
/// says which line and why, and the other lines still count.
pub fn parse(datagram: &[u8]) -> Parsed {
    let mut out = Parsed::default();
    for (n, raw) in datagram.split(|b| *b == b'\n').enumerate() {
        let line_no = n + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.is_empty() {
            continue;
        }
        let Ok(line) = std::str::from_utf8(raw) else {
            out.problems
                .push(format!("line {line_no}: not UTF-8 ({} bytes)", raw.len()));
            continue;
        };
        let Some((key, value)) = line.split_once('=') else {
            out.problems.push(format!(
                "line {line_no}: `{}` is not KEY=VALUE",
                shorten(line, 40)
            ));
            continue;
        };
        let bad_value =
            |what: &str| format!("line {line_no}: {key}={} is not {what}", shorten(value, 40));
        match key {
            "READY" if value == "1" => out.messages.push(Message::Ready),
            "READY" => out.problems.push(bad_value("1")),
            "STOPPING" if value == "1" => out.messages.push(Message::Stopping),
            "STOPPING" => out.problems.push(bad_value("1")),
            "WATCHDOG" if value == "1" => out.messages.push(Message::Watchdog),
            "WATCHDOG" if value == "trigger" => out.messages.push(Message::WatchdogTrigger),
            "WATCHDOG" => out.problems.push(bad_value("1 or trigger")),
            "STATUS" => out
                .messages
                .push(Message::Status(shorten(value, MAX_STATUS))),
            k if IGNORED.contains(&k) => out.messages.push(Message::Ignored(k.to_string())),
            "" => out.problems.push(format!("line {line_no}: empty key")),
            k => out
                .problems
                .push(format!("line {line_no}: unknown key `{}`", shorten(k, 40))),
        }
    }
    out
}

/// `s` on one line, control characters dropped, at most `max` characters (`…` marks a cut).
fn shorten(s: &str, max: usize) -> String {
    let clean: String = s.chars().filter(|c| !c.is_control()).collect();
    if clean.chars().count() <= max {
        return clean;
    }
    let mut cut: String = clean.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// The path of one instance process's notify socket, or why it cannot be used (see
/// [`super::sockets::path`]: the same name and length rule).
pub fn path(dir: &Path, worker: &str, id: u64, epoch: u64) -> Result<PathBuf, String> {
    super::sockets::path(dir, worker, id, epoch)
}

/// Creates `dir` and its parent with mode 0711 (traversable by the instances' users, not
/// listable), fixing the mode of existing ones.
fn ensure_dir(dir: &Path) -> Result<(), String> {
    super::sockets::ensure_dir(dir, 0o711)
}

/// Whether a process with `uid`/`gid` (no supplementary groups: the sandbox drops them) may
/// search every directory above `path`; `Err` names the first that it may not.
fn reachable(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    if uid == 0 {
        return Ok(());
    }
    let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    for d in dirs {
        let m = std::fs::metadata(d).map_err(|e| format!("cannot stat {}: {e}", d.display()))?;
        let mode = m.mode();
        let ok = if m.uid() == uid {
            mode & 0o100 != 0
        } else if m.gid() == gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            return Err(format!(
                "{} (mode {:04o}, owner {}:{}) cannot be searched by the instance's user {uid}:{gid}: it could not reach its NOTIFY_SOCKET; make it o+x or move run_dir",
                d.display(),
                mode & 0o7777,
                m.uid(),
                m.gid()
            ));
        }
    }
    Ok(())
}

/// The bound socket of one instance process (before it is handed to its monitor).
#[derive(Debug)]
pub struct NotifySocket {
    sock: UnixDatagram,
    pub path: PathBuf,
}

impl NotifySocket {
    /// Binds the socket at `path` (directories 0711; a stale socket file there replaced,
    /// anything else refused), with SO_PASSCRED, mode 0600, owned by `owner` (the instance's
    /// uid/gid outside any user namespace; `None`: tqproxy's).
    pub fn bind(path: &Path, owner: Option<(u32, u32)>) -> Result<NotifySocket, String> {
        if let Some(dir) = path.parent() {
            ensure_dir(dir)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
                .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?,
            Ok(_) => {
                return Err(format!(
                    "{} exists and is not a socket: not removing it",
                    path.display()
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot stat {}: {e}", path.display())),
        }
        let sock = UnixDatagram::bind(path)
            .map_err(|e| format!("cannot bind notify socket {}: {e}", path.display()))?;
        let fail = |e: String| {
            let _ = std::fs::remove_file(path);
            e
        };
        nix::sys::socket::setsockopt(&sock, sockopt::PassCred, &true)
            .map_err(|e| fail(format!("SO_PASSCRED on {}: {e}", path.display())))?;
        sock.set_nonblocking(true)
            .map_err(|e| fail(format!("non-blocking {}: {e}", path.display())))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| fail(format!("cannot chmod 0600 {}: {e}", path.display())))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| {
                fail(format!(
                    "cannot chown {} to {uid}:{gid}: {e}",
                    path.display()
                ))
            })?;
            reachable(path, uid, gid).map_err(fail)?;
        }
        Ok(NotifySocket {
            sock,
            path: path.to_owned(),
        })
    }

    /// The receiving end for the monitor of the process `main_pid` (call inside the runtime).
    pub fn into_receiver(self, main_pid: u32) -> io::Result<Receiver> {
        Ok(Receiver {
            sock: tokio::net::UnixDatagram::from_std(self.sock)?,
            main_pid,
            tokens: RATE,
            refill_at: tokio::time::Instant::now() + Duration::from_secs(1),
            log_tokens: LOG_RATE,
            unlogged: 0,
        })
    }
}

/// What one read of the socket gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// A datagram from the instance.
    Datagram(Parsed),
    /// Something dropped whole (too large, a foreign sender, no credentials): why.
    Dropped(String),
}

/// The monitor's end of an instance's notify socket.
pub struct Receiver {
    sock: tokio::net::UnixDatagram,
    main_pid: u32,
    /// Datagrams that may still be read in this second.
    tokens: u32,
    refill_at: tokio::time::Instant,
    /// Log lines about bad input that may still be written in this second, and how many were
    /// not (said in the next line that is).
    log_tokens: u32,
    unlogged: u64,
}

impl Receiver {
    /// The next datagram (cancel-safe: a `select!` may drop the future at any await). Waits
    /// while this second's budget is spent.
    pub async fn recv(&mut self) -> Received {
        loop {
            let now = tokio::time::Instant::now();
            if now >= self.refill_at {
                self.tokens = RATE;
                self.log_tokens = LOG_RATE;
                self.refill_at = now + Duration::from_secs(1);
            }
            if self.tokens == 0 {
                tokio::time::sleep_until(self.refill_at).await;
                continue;
            }
            if self.sock.readable().await.is_err() {
                // Cannot happen for a registered socket; never spin.
                std::future::pending::<()>().await;
            }
            let fd = self.sock.as_raw_fd();
            let mut buf = [0u8; MAX_DATAGRAM];
            let got = self.sock.try_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut buf)];
                // Room for the credentials only: the kernel installs no descriptor a sender
                // attaches (SCM_RIGHTS), it drops them and sets MSG_CTRUNC.
                let mut cmsg = nix::cmsg_space!(UnixCredentials);
                let m = recvmsg::<()>(
                    fd,
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut pid = None;
                if let Ok(cmsgs) = m.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmCredentials(cred) = c {
                            pid = Some(cred.pid());
                        }
                    }
                }
                Ok((m.bytes, m.flags, pid))
            });
            let (len, flags, pid) = match got {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    self.tokens -= 1;
                    return Received::Dropped(format!("read failed: {e}"));
                }
            };
            self.tokens -= 1;
            if flags.contains(MsgFlags::MSG_TRUNC) {
                return Received::Dropped(format!(
                    "a datagram larger than {MAX_DATAGRAM} bytes: ignored"
                ));
            }
            match pid {
                Some(p) if p > 0 && self.belongs(p as u32) => {}
                Some(p) => {
                    return Received::Dropped(format!(
                        "a datagram from pid {p}, not a process of this instance: ignored"
                    ));
                }
                None => {
                    return Received::Dropped(
                        "a datagram without sender credentials: ignored".into(),
                    );
                }
            }
            if flags.contains(MsgFlags::MSG_CTRUNC) {
                // Descriptors were attached (and dropped by the kernel); the text still counts.
                let mut p = parse(&buf[..len]);
                p.problems
                    .push("file descriptors attached: dropped (FDSTORE is not supported)".into());
                return Received::Datagram(p);
            }
            return Received::Datagram(parse(&buf[..len]));
        }
    }

    /// Whether `pid` is the instance's process or in its session.
    fn belongs(&self, pid: u32) -> bool {
        pid == self.main_pid || session_of(pid) == Some(self.main_pid)
    }

    /// Whether a line about bad input may be logged now; `Some(n)`: yes, and `n` earlier ones
    /// were not.
    pub fn may_log(&mut self) -> Option<u64> {
        if self.log_tokens == 0 {
            self.unlogged += 1;
            return None;
        }
        self.log_tokens -= 1;
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// The session id of `pid` (field 6 of /proc/<pid>/stat, after the parenthesised name).
fn session_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

/// The notify socket of process `epoch` of instance `id` of `c`, bound, when `c` has
/// `ready: notify`.
pub fn bind_for(
    c: &crate::config::WorkerConfig,
    run_dir: &Path,
    id: u64,
    epoch: u64,
) -> Result<Option<NotifySocket>, String> {
    if c.ready != crate::config::Ready::Notify {
        return Ok(None);
    }
    let dir = process_dir(run_dir, std::process::id());
    let p = path(&dir, &c.name, id, epoch)?;
    NotifySocket::bind(&p, c.sandbox.user.ids()).map(Some)
}

/// Removes an instance's socket file (its process has exited). A missing file is fine.
pub fn remove(path: &Path) {
    super::sockets::remove(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_messages_tqproxy_acts_on() {
        let p = parse(b"READY=1\nSTATUS=serving 3 requests\nWATCHDOG=1\nSTOPPING=1\n");
        assert_eq!(
            p.messages,
            [
                Message::Ready,
                Message::Status("serving 3 requests".into()),
                Message::Watchdog,
                Message::Stopping
            ]
        );
        assert!(p.problems.is_empty());
        assert_eq!(
            parse(b"WATCHDOG=trigger").messages,
            [Message::WatchdogTrigger]
        );
        // CRLF, empty lines, no trailing newline.
        assert_eq!(parse(b"\r\n\nREADY=1\r\n").messages, [Message::Ready]);
        assert_eq!(parse(b"").messages, []);
        // A STATUS may contain `=`.
        assert_eq!(
            parse(b"STATUS=a=b").messages,
            [Message::Status("a=b".into())]
        );
    }

    #[test]
    fn keys_systemd_knows_are_ignored_by_name() {
        let p = parse(b"RELOADING=1\nMAINPID=42\nFDSTORE=1\nMONOTONIC_USEC=1");
        assert_eq!(
            p.messages,
            ["RELOADING", "MAINPID", "FDSTORE", "MONOTONIC_USEC"]
                .map(|k| Message::Ignored(k.into()))
        );
        assert!(p.problems.is_empty());
    }

    #[test]
    fn every_malformed_line_is_a_problem_naming_it_and_the_rest_still_counts() {
        let p = parse(b"READY=2\nhello\n=x\nBOGUS=1\n\xff\xfe\nSTOPPING=yes\nWATCHDOG=0\nREADY=1");
        assert_eq!(p.messages, [Message::Ready]);
        assert_eq!(
            p.problems,
            [
                "line 1: READY=2 is not 1",
                "line 2: `hello` is not KEY=VALUE",
                "line 3: empty key",
                "line 4: unknown key `BOGUS`",
                "line 5: not UTF-8 (2 bytes)",
                "line 6: STOPPING=yes is not 1",
                "line 7: WATCHDOG=0 is not 1 or trigger",
            ]
        );
    }

    #[test]
    fn long_and_control_characters_are_cut() {
        let long = format!("STATUS={}\n", "x".repeat(5000));
        let p = parse(long.as_bytes());
        let Message::Status(s) = &p.messages[0] else {
            panic!("{p:?}")
        };
        assert_eq!(s.chars().count(), MAX_STATUS);
        assert!(s.ends_with('…'));
        assert_eq!(
            parse(b"STATUS=a\x1b[31mb\x07").messages,
            [Message::Status("a[31mb".into())]
        );
        let p = parse(format!("{}=1", "K".repeat(100)).as_bytes());
        assert!(p.problems[0].len() < 80, "{:?}", p.problems);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every byte value, in many lengths and mixes.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for len in 0..600 {
            let mut d = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let b =
                    [b'=', b'\n', b'R', b'1', b'\r', 0xff, 0xc3, (x >> 8) as u8][(x % 8) as usize];
                d.push(b);
            }
            let p = parse(&d);
            assert!(p.problems.len() + p.messages.len() <= len + 1);
        }
    }

    #[tokio::test]
    async fn a_socket_receives_from_its_instance_and_drops_strangers_and_giants() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(&process_dir(dir.path(), 7), "w", 1, 1).unwrap();
        let s = NotifySocket::bind(&p, None).unwrap();
        for d in [p.parent().unwrap(), &base_dir(dir.path())] {
            assert_eq!(std::fs::metadata(d).unwrap().mode() & 0o777, 0o711);
        }
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        // This test process is the "instance".
        let mut r = s.into_receiver(std::process::id()).unwrap();
        let c = UnixDatagram::unbound().unwrap();
        c.send_to(b"READY=1\nSTATUS=up", &p).unwrap();
        assert_eq!(
            r.recv().await,
            Received::Datagram(Parsed {
                messages: vec![Message::Ready, Message::Status("up".into())],
                problems: vec![]
            })
        );
        c.send_to(&vec![b'x'; MAX_DATAGRAM + 1], &p).unwrap();
        let Received::Dropped(why) = r.recv().await else {
            panic!()
        };
        assert!(why.contains("larger than 4096"), "{why}");
        // Another process: a child that sends and exits.
        let st = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,sys; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.sendto(b'READY=1', sys.argv[1])",
            ])
            .arg(&p)
            .status();
        if st.is_ok_and(|s| s.success()) {
            let Received::Dropped(why) = r.recv().await else {
                panic!()
            };
            assert!(why.contains("not a process of this instance"), "{why}");
        }
        // A stale socket file is replaced on the next bind; anything else is not touched.
        drop(r);
        NotifySocket::bind(&p, None).unwrap();
        remove(&p);
        std::fs::write(&p, "data").unwrap();
        assert!(
            NotifySocket::bind(&p, None)
                .unwrap_err()
                .contains("is not a socket")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_read_at_the_rate_and_no_faster() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(&process_dir(dir.path(), 7), "w", 1, 1).unwrap();
        let mut r = NotifySocket::bind(&p, None)
            .unwrap()
            .into_receiver(std::process::id())
            .unwrap();
        // The kernel queues few datagrams (net.unix.max_dgram_qlen): a thread keeps sending,
        // blocking while the queue is full.
        let to = p.clone();
        let sender = std::thread::spawn(move || {
            let c = UnixDatagram::unbound().unwrap();
            c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            (0..=RATE).all(|_| c.send_to(b"WATCHDOG=1", &to).is_ok())
        });
        let start = tokio::time::Instant::now();
        for _ in 0..RATE {
            r.recv().await;
        }
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "the budget is read at once"
        );
        r.recv().await;
        assert!(start.elapsed() >= Duration::from_secs(1), "then it waits");
        assert!(sender.join().unwrap());
    }

    #[test]
    fn reachability_names_the_directory_that_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("a/b");
        std::fs::create_dir_all(&inner).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.path().join("a"), std::fs::Permissions::from_mode(0o700))
            .unwrap();
        let e = reachable(&inner.join("s.sock"), 61999, 61999).unwrap_err();
        assert!(
            e.contains(&format!("{} (mode 0700", dir.path().join("a").display())),
            "{e}"
        );
        reachable(&inner.join("s.sock"), 0, 0).unwrap();
    }
}
