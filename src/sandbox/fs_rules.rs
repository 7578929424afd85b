//! Landlock: filesystem access rules the worker cannot undo.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, make_bitflags,
};

use super::{LandlockSpec, SandboxError};

/// The Landlock ABI whose filesystem rights tqproxy handles: the best one it was tested on
/// (ABI 7, Linux 6.15; its filesystem rights are those of ABI 5: ABI 1's plus `Refer`,
/// `Truncate` and `IoctlDev`). On an older kernel the landlock crate's best-effort mode
/// handles what that kernel knows; on a kernel without Landlock the helper fails (and
/// [`super::check_spec`] says so first).
///
/// Raising this to ABI 9 would add `ResolveUnix`: workers could then no longer connect to
/// unix sockets outside their read-write paths.
const ABI_HANDLED: ABI = ABI::V7;

/// What the base set grants on a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseAccess {
    /// Read files, list directories, execute.
    ReadExecute,
    /// Read files and list directories (no execute).
    Read,
    /// Everything (read, write, create, remove, truncate, ioctl on devices).
    ReadWrite,
}

/// The paths every worker gets with landlock on, besides its own `read_write`/`read_only`
/// paths, the directory of its program and its `cwd` (both read + execute). Paths missing on
/// the host are skipped.
///
/// | path | access |
/// |---|---|
/// | `/usr`, `/lib`, `/lib64`, `/bin`, `/sbin`, `/etc` | read + execute |
/// | `/proc`, `/sys`, `/dev` | read |
/// | `/dev/null`, `/dev/zero`, `/dev/urandom`, `/dev/random`, `/dev/tty` | read + write |
/// | `/tmp` | read + write (everything) |
pub const LANDLOCK_BASE: &[(&str, BaseAccess)] = &[
    ("/usr", BaseAccess::ReadExecute),
    ("/lib", BaseAccess::ReadExecute),
    ("/lib64", BaseAccess::ReadExecute),
    ("/bin", BaseAccess::ReadExecute),
    ("/sbin", BaseAccess::ReadExecute),
    ("/etc", BaseAccess::ReadExecute),
    ("/proc", BaseAccess::Read),
    ("/sys", BaseAccess::Read),
    ("/dev", BaseAccess::Read),
    ("/dev/null", BaseAccess::ReadWrite),
    ("/dev/zero", BaseAccess::ReadWrite),
    ("/dev/urandom", BaseAccess::ReadWrite),
    ("/dev/random", BaseAccess::ReadWrite),
    ("/dev/tty", BaseAccess::ReadWrite),
    ("/tmp", BaseAccess::ReadWrite),
];

fn rights(a: BaseAccess) -> BitFlags<AccessFs> {
    match a {
        BaseAccess::ReadExecute => AccessFs::from_read(ABI_HANDLED),
        BaseAccess::Read => make_bitflags!(AccessFs::{ReadFile | ReadDir}),
        BaseAccess::ReadWrite => AccessFs::from_all(ABI_HANDLED),
    }
}

/// Every rule for `spec`, in order: the base set, the program's directory and cwd, then the
/// spec's own paths.
pub(crate) fn rules(spec: &LandlockSpec, program: &Path, cwd: &Path) -> Vec<(PathBuf, BaseAccess)> {
    let mut out: Vec<(PathBuf, BaseAccess)> = LANDLOCK_BASE
        .iter()
        .map(|(p, a)| (PathBuf::from(p), *a))
        .collect();
    if let Some(dir) = program.parent() {
        out.push((dir.to_owned(), BaseAccess::ReadExecute));
    }
    out.push((cwd.to_owned(), BaseAccess::ReadExecute));
    out.extend(
        spec.read_only
            .iter()
            .map(|p| (p.clone(), BaseAccess::ReadExecute)),
    );
    out.extend(
        spec.read_write
            .iter()
            .map(|p| (p.clone(), BaseAccess::ReadWrite)),
    );
    out
}

/// Creates the ruleset and restricts the calling process (no_new_privs must be set).
pub(crate) fn restrict(
    spec: &LandlockSpec,
    program: &Path,
    cwd: &Path,
) -> Result<(), SandboxError> {
    let err =
        |what: &str, e: &dyn std::fmt::Display| SandboxError::Landlock(format!("{what}: {e}"));
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_HANDLED))
        .map_err(|e| err("handle access", &e))?
        .create()
        .map_err(|e| err("create ruleset", &e))?;
    for (path, access) in rules(spec, program, cwd) {
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(SandboxError::Read { path, source }),
        };
        let mut access = rights(access);
        if !meta.is_dir() {
            access &= AccessFs::from_file(ABI_HANDLED);
        }
        let fd = PathFd::new(&path).map_err(|e| err(&format!("open {}", path.display()), &e))?;
        ruleset = ruleset
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| err(&format!("add rule for {}", path.display()), &e))?;
    }
    let status = ruleset
        .restrict_self()
        .map_err(|e| err("restrict self", &e))?;
    if status.ruleset == RulesetStatus::NotEnforced {
        return Err(SandboxError::Unsupported(
            "landlock (not enforced by the running kernel)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_include_base_program_dir_cwd_and_spec_paths() {
        let spec = LandlockSpec {
            read_write: vec!["/srv/data".into()],
            read_only: vec!["/srv/static".into()],
        };
        let r = rules(
            &spec,
            Path::new("/opt/app/bin/hello"),
            Path::new("/opt/app"),
        );
        let get = |p: &str| r.iter().find(|(q, _)| q == Path::new(p)).map(|(_, a)| *a);
        assert_eq!(get("/usr"), Some(BaseAccess::ReadExecute));
        assert_eq!(get("/proc"), Some(BaseAccess::Read));
        assert_eq!(get("/dev/null"), Some(BaseAccess::ReadWrite));
        assert_eq!(get("/tmp"), Some(BaseAccess::ReadWrite));
        assert_eq!(get("/opt/app/bin"), Some(BaseAccess::ReadExecute));
        assert_eq!(get("/opt/app"), Some(BaseAccess::ReadExecute));
        assert_eq!(get("/srv/static"), Some(BaseAccess::ReadExecute));
        assert_eq!(get("/srv/data"), Some(BaseAccess::ReadWrite));
        assert_eq!(get("/root"), None);
    }

    #[test]
    fn read_rights_do_not_include_execute_or_write() {
        let r = rights(BaseAccess::Read);
        assert!(r.contains(AccessFs::ReadFile));
        assert!(!r.contains(AccessFs::Execute));
        assert!(!r.contains(AccessFs::WriteFile));
        assert!(rights(BaseAccess::ReadExecute).contains(AccessFs::Execute));
        assert!(rights(BaseAccess::ReadWrite).contains(AccessFs::Truncate));
    }
}
