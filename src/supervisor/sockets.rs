//! The listening sockets of `transport: unix` instances.
//!
//! tqproxy creates one unix stream socket per instance process, bound at
//! `<run_dir>/sockets/<tqproxy pid>/<worker>.<id>.<epoch>.sock`, and passes it as fd 3 like a
//! TCP listener (`LISTEN_FDS`). The directory per tqproxy process keeps two processes apart
//! during `tqproxy upgrade` (both number their instances from 1) and makes cleanup simple: a
//! socket file is removed when its instance has exited, the directory when tqproxy stops, and
//! directories of tqproxy processes that no longer run (killed with SIGKILL) at the next start.
//! Both directories are mode 0700: only tqproxy (root) connects; the instance needs no access
//! to the file, it accepts on the descriptor it inherited.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// The longest path a unix socket address holds: `sun_path` is 108 bytes on Linux, NUL
/// included.
pub const SUN_PATH_MAX: usize = 107;

/// Where the sockets of all tqproxy processes using `run_dir` live.
pub fn base_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("sockets")
}

/// The sockets directory of the tqproxy process `pid`.
pub fn process_dir(run_dir: &Path, pid: u32) -> PathBuf {
    base_dir(run_dir).join(pid.to_string())
}

/// The socket path of one instance process, or why it cannot be used (too long for a socket
/// address: the error names the path, its length and what to shorten).
pub fn path(dir: &Path, worker: &str, id: u64, epoch: u64) -> Result<PathBuf, String> {
    let p = dir.join(format!("{worker}.{id}.{epoch}.sock"));
    let len = p.as_os_str().len();
    if len > SUN_PATH_MAX {
        return Err(format!(
            "unix socket path {} is {len} bytes, more than the {SUN_PATH_MAX} a socket address holds: use a shorter run_dir",
            p.display()
        ));
    }
    Ok(p)
}

/// Creates `dir` (and its parent, the `sockets` or `notify` directory) with `mode`, fixing the
/// mode of existing ones.
pub(super) fn ensure_dir(dir: &Path, mode: u32) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for d in [dir, dir.parent().unwrap_or(dir)] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot chmod {mode:04o} {}: {e}", d.display()))?;
    }
    Ok(())
}

/// Binds a listening socket at `path` (its directory created 0700; a stale socket file left
/// there removed first). Anything but a socket at `path` is an error, never removed.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        ensure_dir(dir, 0o700)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path)
                .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
        }
        Ok(_) => {
            return Err(format!(
                "{} exists and is not a socket: not removing it",
                path.display()
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot stat {}: {e}", path.display())),
    }
    let l = UnixListener::bind(path)
        .map_err(|e| format!("cannot bind unix socket {}: {e}", path.display()))?;
    // The same backlog the workers use for their own TCP listeners.
    let backlog =
        nix::sys::socket::Backlog::new(1024).unwrap_or(nix::sys::socket::Backlog::MAXCONN);
    if let Err(e) = nix::sys::socket::listen(&l, backlog) {
        let _ = std::fs::remove_file(path);
        return Err(format!("cannot listen on {}: {e}", path.display()));
    }
    Ok(l)
}

/// Removes an instance's socket file (its process has exited). A missing file is fine.
pub fn remove(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "socket file not removed"),
    }
}

/// Removes a tqproxy process's sockets directory with whatever is left in it.
pub fn remove_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "sockets directory not removed"),
    }
}

/// Removes the sockets directories of tqproxy processes that no longer run (a `kill -9`
/// leaves one behind), those of `transport: unix` and those of `ready: notify`
/// (`<run_dir>/notify/<pid>`); returns what was removed. The directory of a live process (the
/// old tqproxy during an upgrade) and anything not named by a pid are left alone.
pub fn cleanup_stale(run_dir: &Path, own_pid: u32) -> Vec<PathBuf> {
    let mut removed = cleanup_stale_in(&base_dir(run_dir), own_pid);
    removed.extend(cleanup_stale_in(&super::notify::base_dir(run_dir), own_pid));
    removed
}

fn cleanup_stale_in(base: &Path, own_pid: u32) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(base) else {
        return removed;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == own_pid || pid == 0 || !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = e.path();
        if std::fs::remove_dir_all(&dir).is_ok() {
            removed.push(dir);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::UnixStream;

    #[test]
    fn bind_creates_a_private_directory_and_replaces_a_stale_socket() {
        let run = tempfile::tempdir().unwrap();
        let dir = process_dir(run.path(), 4242);
        let p = path(&dir, "w", 1, 1).unwrap();
        assert_eq!(p, run.path().join("sockets/4242/w.1.1.sock"));
        let l = bind(&p).unwrap();
        for d in [&dir, &base_dir(run.path())] {
            let m = std::fs::metadata(d).unwrap();
            assert_eq!(m.mode() & 0o777, 0o700, "{}", d.display());
            assert_eq!(m.uid(), nix::unistd::geteuid().as_raw());
        }
        // It accepts.
        let mut c = UnixStream::connect(&p).unwrap();
        let (mut s, _) = l.accept().unwrap();
        c.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");
        // A socket file left by an earlier process is replaced.
        drop((l, s, c));
        assert!(p.exists());
        let l2 = bind(&p).unwrap();
        UnixStream::connect(&p).unwrap();
        drop(l2);
        remove(&p);
        assert!(!p.exists());
        remove(&p); // already gone: fine
    }

    #[test]
    fn bind_never_removes_what_is_not_a_socket() {
        let run = tempfile::tempdir().unwrap();
        let p = path(&process_dir(run.path(), 1), "w", 1, 1).unwrap();
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "data").unwrap();
        let e = bind(&p).unwrap_err();
        assert!(e.contains("is not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "data");
    }

    #[test]
    fn paths_longer_than_a_socket_address_are_refused_with_the_reason() {
        let long = PathBuf::from(format!("/run/{}", "d".repeat(90)));
        let dir = process_dir(&long, 12345);
        let e = path(&dir, "hello", 1, 1).unwrap_err();
        assert!(
            e.contains("is 124 bytes, more than the 107 a socket address holds")
                && e.contains("use a shorter run_dir"),
            "{e}"
        );
        // `tqproxy check` (config::unix_socket_paths_fit) counts the same layout: the limit it
        // names is where binding starts to fail.
        let e = fits(&long, "hello").unwrap_err();
        assert!(e.contains("use a shorter run_dir (at most"), "{e}");
        let max: usize = e
            .rsplit("at most ")
            .next()
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        let ok = PathBuf::from(format!("/{}", "r".repeat(max - 1)));
        assert_eq!(ok.as_os_str().len(), max);
        fits(&ok, "hello").unwrap();
        let too_long = PathBuf::from(format!("/{}", "r".repeat(max)));
        assert!(fits(&too_long, "hello").is_err());
        fits(Path::new("/run/tqproxy"), &"w".repeat(48)).unwrap();
    }

    /// The check `tqproxy check` makes, asserted against the path this module really binds
    /// (with the largest pid, instance id and epoch the check allows for).
    fn fits(run_dir: &Path, worker: &str) -> Result<(), String> {
        let checked = crate::config::unix_socket_paths_fit(run_dir, worker);
        let bound = path(&process_dir(run_dir, 9_999_999), worker, 999_999, 999_999);
        assert_eq!(checked.is_ok(), bound.is_ok(), "{}", run_dir.display());
        checked
    }

    #[test]
    fn stale_directories_of_dead_processes_are_removed() {
        let run = tempfile::tempdir().unwrap();
        let own = std::process::id();
        // A pid that is not running: above the kernel's pid_max.
        let dead = 4_194_305 + 1;
        for pid in [own, dead, 1] {
            std::fs::create_dir_all(process_dir(run.path(), pid)).unwrap();
        }
        std::fs::create_dir_all(base_dir(run.path()).join("not-a-pid")).unwrap();
        let removed = cleanup_stale(run.path(), own);
        assert_eq!(removed, vec![process_dir(run.path(), dead)]);
        assert!(process_dir(run.path(), own).exists());
        assert!(process_dir(run.path(), 1).exists(), "pid 1 is alive");
        assert!(base_dir(run.path()).join("not-a-pid").exists());
        remove_dir(&process_dir(run.path(), own));
        assert!(!process_dir(run.path(), own).exists());
    }
}
