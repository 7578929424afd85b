//! Namespace setup inside the new namespaces: the filesystem view (mount namespace), the
//! hostname (uts) and the loopback interface (net). Runs in the helper (no pid namespace) or
//! in init (pid namespace), before the worker's credentials are dropped.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MsFlags, mount};
use nix::sys::statvfs::{FsFlags, statvfs};

use super::helper::Failure;
use super::{SandboxError, SpawnSpec, sys};

/// What `/proc` paths stay read-only under a read-only root once a fresh proc is mounted
/// (as Docker does): sysctls and hardware knobs are not the worker's to change.
const PROC_READ_ONLY: [&str; 5] = [
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/proc/irq",
    "/proc/bus",
    "/proc/fs",
];

/// Size of the tmpfs put over hidden directories: empty and read-only, it needs nothing.
const HIDE_TMPFS_OPTIONS: &str = "mode=0755,size=4k";
/// Private /tmp, /var/tmp, /dev/shm.
const TMP_TMPFS_OPTIONS: &str = "mode=1777,size=64m";

/// Mount namespace, hostname, loopback: each in the namespace the spec asked for.
pub(crate) fn setup(spec: &SpawnSpec) -> Result<(), Failure> {
    let ns = spec.namespaces;
    if ns.needs_mount_ns() {
        filesystem(spec).map_err(|e| Failure::from(("mounts", e)))?;
    }
    if ns.uts
        && let Some(name) = &spec.hostname
    {
        nix::unistd::sethostname(name)
            .map_err(|e| SandboxError::sys(format!("sethostname({name:?})"), e))
            .map_err(|e| Failure::from(("hostname", e)))?;
    }
    if ns.net {
        sys::loopback_up()
            .map_err(|e| SandboxError::sys("bring lo up (SIOCSIFFLAGS IFF_UP)", e))
            .map_err(|e| Failure::from(("network", e)))?;
    }
    Ok(())
}

fn cstr(p: &Path) -> Result<CString, SandboxError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| SandboxError::InvalidSpec(format!("path {} contains NUL", p.display())))
}

fn filesystem(spec: &SpawnSpec) -> Result<(), SandboxError> {
    let m = &spec.mounts;
    // Nothing mounted here propagates to the host, and nothing the host mounts later shows up.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| SandboxError::sys("mount(/, MS_REC|MS_PRIVATE)", e))?;

    // The whole tree read-only, then the exceptions on top (a bind mount copies the read-only
    // flag of its source, so the read-write ones are flipped back explicitly).
    if m.read_only_root {
        tree_read_only()?;
    }
    for p in &m.read_write {
        bind_self(p, false)?;
    }
    for p in &m.read_only {
        bind_self(p, true)?;
    }
    for p in &m.hide {
        hide(p)?;
    }
    if m.private_tmp {
        tmpfs(Path::new("/tmp"), TMP_TMPFS_OPTIONS, MsFlags::empty())?;
        for p in ["/var/tmp", "/dev/shm"] {
            if Path::new(p).is_dir() {
                tmpfs(Path::new(p), TMP_TMPFS_OPTIONS, MsFlags::empty())?;
            }
        }
    }
    if spec.namespaces.pid {
        mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| SandboxError::sys("mount(proc, /proc)", e))?;
        if m.read_only_root {
            for p in PROC_READ_ONLY {
                if Path::new(p).exists() {
                    bind_self(Path::new(p), true)?;
                }
            }
        }
    }
    Ok(())
}

/// `mount_setattr(/, AT_RECURSIVE, MOUNT_ATTR_RDONLY)`; on kernels without it (< 5.12), a
/// read-only bind remount of every mount point in /proc/self/mountinfo.
fn tree_read_only() -> Result<(), SandboxError> {
    match sys::mount_setattr(c"/", true, sys::MOUNT_ATTR_RDONLY, 0) {
        Ok(()) => Ok(()),
        Err(Errno::ENOSYS) => tree_read_only_fallback(),
        Err(e) => Err(SandboxError::sys(
            "mount_setattr(/, AT_RECURSIVE, MOUNT_ATTR_RDONLY)",
            e,
        )),
    }
}

fn tree_read_only_fallback() -> Result<(), SandboxError> {
    let path = "/proc/self/mountinfo";
    let info = std::fs::read_to_string(path).map_err(|source| SandboxError::Read {
        path: path.into(),
        source,
    })?;
    for mp in mount_points(&info) {
        match remount(&mp, true) {
            Ok(()) => {}
            // Gone, or shadowed by a later mount on the same path: nothing to do.
            Err(SandboxError::Sys {
                source: Errno::ENOENT | Errno::EINVAL,
                ..
            }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Mount points (field 5) of /proc/self/mountinfo in order (parents before children), with
/// the octal escapes (`\040` for a space) decoded.
pub(crate) fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_octal(field)))
        .collect()
}

fn unescape_octal(s: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// Bind-mounts `p` onto itself (recursively) and makes it read-only or read-write.
fn bind_self(p: &Path, read_only: bool) -> Result<(), SandboxError> {
    mount(
        Some(p),
        p,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| SandboxError::sys(format!("bind-mount {} onto itself", p.display()), e))?;
    set_read_only(p, read_only, true)
}

/// Sets or clears the read-only flag of the mount at `p` (and below it when `recursive`),
/// keeping its other flags.
fn set_read_only(p: &Path, read_only: bool, recursive: bool) -> Result<(), SandboxError> {
    let c = cstr(p)?;
    let (set, clr) = if read_only {
        (sys::MOUNT_ATTR_RDONLY, 0)
    } else {
        (0, sys::MOUNT_ATTR_RDONLY)
    };
    match sys::mount_setattr(&c, recursive, set, clr) {
        Ok(()) => Ok(()),
        Err(Errno::ENOSYS) => remount(p, read_only),
        Err(e) => Err(SandboxError::sys(
            format!(
                "mount_setattr({}, {}MOUNT_ATTR_RDONLY)",
                p.display(),
                if read_only { "set " } else { "clear " }
            ),
            e,
        )),
    }
}

/// `mount(MS_BIND|MS_REMOUNT[|MS_RDONLY])` keeping the flags the mount already has (nosuid,
/// nodev, noexec, atime): a bind remount resets every flag it is not given.
fn remount(p: &Path, read_only: bool) -> Result<(), SandboxError> {
    let what = || {
        format!(
            "remount {} {}",
            p.display(),
            if read_only { "ro" } else { "rw" }
        )
    };
    let st = statvfs(p).map_err(|e| SandboxError::sys(what(), e))?;
    let f = st.flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT;
    for (has, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(has) {
            flags |= ms;
        }
    }
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, p, None::<&str>, flags, None::<&str>)
        .map_err(|e| SandboxError::sys(what(), e))
}

/// Hides `p`: an empty read-only tmpfs over a directory, `/dev/null` over anything else.
/// Missing paths are skipped.
fn hide(p: &Path) -> Result<(), SandboxError> {
    let meta = match std::fs::metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SandboxError::Read {
                path: p.to_owned(),
                source,
            });
        }
    };
    if meta.is_dir() {
        tmpfs(
            p,
            HIDE_TMPFS_OPTIONS,
            MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC,
        )
    } else {
        mount(
            Some("/dev/null"),
            p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| SandboxError::sys(format!("bind-mount /dev/null over {}", p.display()), e))?;
        set_read_only(p, true, false)
    }
}

fn tmpfs(p: &Path, options: &str, extra: MsFlags) -> Result<(), SandboxError> {
    mount(
        Some("tmpfs"),
        p,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | extra,
        Some(options),
    )
    .map_err(|e| SandboxError::sys(format!("mount tmpfs ({options}) on {}", p.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_decode_escapes() {
        let info = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                    27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    40 27 0:40 / /mnt/a\\040b rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mount_points(info),
            [
                PathBuf::from("/proc"),
                PathBuf::from("/"),
                PathBuf::from("/mnt/a b")
            ]
        );
    }
}
