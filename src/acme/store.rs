//! The state directory (`tls.acme.state_dir`, 0700), shared by every tqproxy process of one
//! configuration (the old and the new one of `tqproxy upgrade`):
//!
//! ```text
//! state_dir/
//!   lock                              flock(2) held by the process placing an order
//!   account-<directory>.json          the ACME account (its key), one per CA directory
//!   certs/<first domain>.pem          private key + certificate chain, in one file (0600)
//!   challenges/<kind>-<token|name>    a pending challenge's key authorization
//! ```
//!
//! Every file is written to a temporary name in the same directory, synced, then renamed, so a
//! reader (the other process, or this one after a crash) sees the old file or the new one,
//! never half of one. Key and chain share one file for the same reason: they change together.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::ChallengeKind;

/// Creates the state directory (0700) if needed and checks that it is a writable directory.
pub fn prepare_dir(dir: &Path) -> Result<(), String> {
    let what = |e: std::io::Error| format!("state_dir {}: {e}", dir.display());
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(what)?;
    }
    if !dir.is_dir() {
        return Err(format!("state_dir {}: not a directory", dir.display()));
    }
    // It holds private keys: ours alone, even if it was made by hand.
    if let Err(e) = fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
        tracing::warn!(state_dir = %dir.display(), error = %e, "cannot make the state directory 0700");
    }
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    File::create(&probe).map_err(|e| format!("state_dir {}: not writable: {e}", dir.display()))?;
    let _ = fs::remove_file(&probe);
    for sub in ["certs", "challenges"] {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir.join(sub))
            .map_err(what)?;
    }
    Ok(())
}

/// What `tqproxy check` says of a state directory without creating it: it is a writable
/// directory, or it does not exist yet and its nearest existing parent is one.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    let mut at = dir;
    loop {
        if at.exists() {
            if !at.is_dir() {
                return Err(format!("{}: not a directory", at.display()));
            }
            return nix::unistd::access(at, nix::unistd::AccessFlags::W_OK)
                .map_err(|e| format!("{}: not writable: {e}", at.display()));
        }
        match at.parent() {
            Some(p) => at = p,
            None => return Err(format!("{}: no existing parent", dir.display())),
        }
    }
}

/// Writes `bytes` to `path` atomically (a temporary file in the same directory, fsync,
/// rename), with permissions `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let r = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(parent) = path.parent() {
            File::open(parent)?.sync_all()?;
        }
        Ok::<(), std::io::Error>(())
    })();
    r.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

/// `account-<directory>.json`: one account per CA directory (the same state directory may
/// move from staging to production).
pub fn account_path(dir: &Path, directory: &str) -> PathBuf {
    let slug: String = directory
        .trim_start_matches("https://")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(100)
        .collect();
    dir.join(format!("account-{slug}.json"))
}

/// The certificate file (key + chain) of the certificate whose first domain is `first`.
pub fn cert_path(dir: &Path, first: &str) -> PathBuf {
    dir.join("certs").join(format!("{first}.pem"))
}

/// A base64url token as ACME servers issue them (RFC 8555 §8.3: at least 128 bits): safe as a
/// file name and nothing else.
pub fn is_token(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 256
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn challenge_path(dir: &Path, kind: ChallengeKind, id: &str) -> Option<PathBuf> {
    let safe = match kind {
        ChallengeKind::Http01 => is_token(id),
        ChallengeKind::TlsAlpn01 => super::check_domain(id, kind).is_ok_and(|n| n == id),
    };
    safe.then(|| {
        dir.join("challenges")
            .join(format!("{}-{id}", kind.as_str()))
    })
}

/// Records a pending challenge for another process that may receive the CA's validation.
pub fn write_challenge(
    dir: &Path,
    kind: ChallengeKind,
    id: &str,
    key_auth: &str,
) -> Result<(), String> {
    let path = challenge_path(dir, kind, id)
        .ok_or_else(|| format!("{}: unusable challenge id `{id}`", kind.as_str()))?;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    write_atomic(&path, key_auth.as_bytes(), 0o600)
}

pub fn remove_challenge(dir: &Path, kind: ChallengeKind, id: &str) {
    if let Some(p) = challenge_path(dir, kind, id) {
        let _ = fs::remove_file(p);
    }
}

/// The key authorization of a pending challenge on disk (`id`: a token or a name, from the
/// network: checked before it becomes a path).
pub fn pending_challenge(dir: &Path, kind: ChallengeKind, id: &str) -> Option<String> {
    let p = challenge_path(dir, kind, id)?;
    let s = fs::read_to_string(p).ok()?;
    (s.len() < 1024).then(|| s.trim().to_string())
}

/// The state directory's lock, held while an order is placed; released when dropped (or when
/// the process dies: flock(2) locks go with the file descriptor).
pub struct StateLock {
    _lock: Flock<File>,
}

/// Takes the lock if no other process holds it (`Ok(None)` if one does).
pub fn try_lock(dir: &Path) -> Result<Option<StateLock>, String> {
    let path = dir.join("lock");
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(StateLock { _lock: l })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_replace_whole_files_with_their_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.pem");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("f.pem")],
            "no temp file left"
        );
        let e = write_atomic(&d.path().join("no/such/dir/f"), b"x", 0o600).unwrap_err();
        assert!(e.contains("cannot write"), "{e}");
    }

    #[test]
    fn the_state_dir_is_made_private_and_checked() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("a/acme");
        check_dir(&s).unwrap();
        fs::create_dir_all(&s).unwrap();
        fs::set_permissions(&s, fs::Permissions::from_mode(0o755)).unwrap();
        prepare_dir(&s).unwrap();
        assert_eq!(
            fs::metadata(&s).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(s.join("certs").is_dir());
        let file = d.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(prepare_dir(&file).unwrap_err().contains("not a directory"));
        assert!(
            check_dir(&file.join("x"))
                .unwrap_err()
                .contains("not a directory")
        );
    }

    #[test]
    fn one_lock_holder_at_a_time() {
        let d = tempfile::tempdir().unwrap();
        let a = try_lock(d.path()).unwrap();
        assert!(a.is_some());
        // flock(2) locks are per open file: a second open, even in this process, is refused.
        assert!(try_lock(d.path()).unwrap().is_none());
        drop(a);
        assert!(try_lock(d.path()).unwrap().is_some());
    }

    #[test]
    fn challenge_ids_never_become_other_paths() {
        let d = tempfile::tempdir().unwrap();
        let k = ChallengeKind::Http01;
        assert!(write_challenge(d.path(), k, "../x", "k").is_err());
        assert!(write_challenge(d.path(), k, "a/b", "k").is_err());
        write_challenge(d.path(), k, "tok", "tok.k").unwrap();
        assert_eq!(
            pending_challenge(d.path(), k, "tok").as_deref(),
            Some("tok.k")
        );
        let t = ChallengeKind::TlsAlpn01;
        assert!(write_challenge(d.path(), t, "../a.test", "k").is_err());
        write_challenge(d.path(), t, "a.test", "k2").unwrap();
        assert_eq!(
            pending_challenge(d.path(), t, "a.test").as_deref(),
            Some("k2")
        );
        remove_challenge(d.path(), t, "a.test");
        assert_eq!(pending_challenge(d.path(), t, "a.test"), None);
        assert_eq!(
            account_path(d.path(), "https://127.0.0.1:14000/dir"),
            d.path().join("account-127_0_0_1_14000_dir.json")
        );
    }
}
