//! Seccomp: tqproxy's default deny-list and OCI/Docker JSON profiles, compiled to one classic
//! BPF program for the running architecture.
//!
//! seccompiler builds the per-rule argument checks (`SeccompRule` → BPF); this module lays
//! out the program around them so that every rule can carry its own action (seccompiler's
//! `SeccompFilter` has one match action per filter, and stacking one filter per action does
//! not compose when the default action is not "allow"). The layout is seccompiler's own:
//!
//! ```text
//! ld arch; jeq AUDIT_ARCH_<native> ? +1 : ret KILL_PROCESS
//! ld nr;  (x86_64) jge 0x40000000 ? ret KILL_PROCESS      x32 numbers never reach the rules
//! for each syscall: jeq nr ? enter : skip
//!     rule 1: [ja enter][ja next-rule-skip][arg checks → next rule on mismatch][ret action]
//!     rule 2: …    (conditional rules first, in profile order; an unconditional rule last)
//!     ret default
//! ret default
//! ```

use std::collections::BTreeMap;
use std::str::FromStr;

use nix::errno::Errno;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule,
    sock_filter,
};
use serde::Deserialize;

use super::{SandboxError, SeccompSpec};

/// Syscalls the default filter makes fail with EPERM. The brief list (Docker's default
/// profile, as a deny-list) plus the new mount API (`fsopen` … `mount_setattr`: `mount` by
/// other means) and the other ptrace equivalents (`pidfd_getfd`, `process_madvise`, `kcmp`).
/// Names that do not exist on the running architecture (`iopl`, `ioperm` off x86) are skipped.
pub const DEFAULT_DENY: &[&str] = &[
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kexec_load",
    "kexec_file_load",
    "bpf",
    "perf_event_open",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "setns",
    "unshare",
    "keyctl",
    "add_key",
    "request_key",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "open_by_handle_at",
    "name_to_handle_at",
    "userfaultfd",
    "quotactl",
    "lookup_dcookie",
    "vhangup",
    "iopl",
    "ioperm",
    "syslog",
    // Beyond Docker's list.
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "quotactl_fd",
    "pidfd_getfd",
    "process_madvise",
    "kcmp",
];

/// `clone` flags that create namespaces: `clone` with any of them fails with EPERM.
const CLONE_NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// The architecture the filter is compiled for: the one tqproxy runs on.
struct Arch {
    target: seccompiler::TargetArch,
    audit: u32,
    /// Name in Docker's `includes.arches` (Go's GOARCH).
    go_name: &'static str,
    /// Name in OCI's `architectures`.
    scmp_name: &'static str,
}

fn native_arch() -> Result<Arch, SandboxError> {
    match std::env::consts::ARCH {
        "x86_64" => Ok(Arch {
            target: seccompiler::TargetArch::x86_64,
            audit: 0xC000_003E,
            go_name: "amd64",
            scmp_name: "SCMP_ARCH_X86_64",
        }),
        "aarch64" => Ok(Arch {
            target: seccompiler::TargetArch::aarch64,
            audit: 0xC000_00B7,
            go_name: "arm64",
            scmp_name: "SCMP_ARCH_AARCH64",
        }),
        _ => Err(SandboxError::Unsupported(
            "seccomp on this architecture (x86_64 and aarch64 only)",
        )),
    }
}

/// Parses and compiles a seccomp setting without installing it: what `tqproxy check` and
/// reload call. `Off` is always fine.
///
/// `Default` is a deny-list: the syscalls of [`DEFAULT_DENY`] fail with EPERM, so do
/// `socket(AF_PACKET, …)` and `clone` with any namespace flag, `clone3` fails with ENOSYS
/// (libcs then fall back to `clone`, which is checked: Docker does the same), everything else
/// (`execve` included) is allowed. x32 syscall numbers and other architectures' syscalls kill
/// the process.
///
/// `Profile(path)` is an OCI runtime-spec / Docker profile (`defaultAction`,
/// `defaultErrnoRet`, `architectures`, `syscalls: [{names, action, errnoRet, args: [{index,
/// value, valueTwo, op}], includes, excludes}]`), translated for the running architecture:
///
/// * actions `SCMP_ACT_ALLOW`, `SCMP_ACT_ERRNO` (errno `errnoRet`, else `defaultErrnoRet`
///   for the default action, else EPERM), `SCMP_ACT_KILL` (= `KILL_THREAD`),
///   `SCMP_ACT_KILL_THREAD`, `SCMP_ACT_KILL_PROCESS`, `SCMP_ACT_TRAP`, `SCMP_ACT_LOG`,
///   `SCMP_ACT_TRACE`; `SCMP_ACT_NOTIFY` is not supported;
/// * operators `SCMP_CMP_EQ/NE/LT/LE/GT/GE` on the 64-bit argument, `SCMP_CMP_MASKED_EQ`
///   (`arg & value == valueTwo`); several conditions in one entry must all hold, except when
///   two name the same argument: then each makes its own rule (runc's behaviour);
/// * for one syscall, conditional rules are tried in profile order, then the first
///   unconditional one; the first that matches decides;
/// * a name unknown on every architecture is an error; a name that exists only on other
///   architectures (`chown32`, `_llseek`) is skipped; so are entries whose
///   `includes.arches`/`excludes.arches` rule out the running one, whose `includes.minKernel`
///   is newer than the running kernel, or that `includes.caps` (workers are judged as
///   holding no capabilities); `flags`, `archMap` and `comment` are ignored.
///
/// **An allow-list profile (`defaultAction` not `SCMP_ACT_ALLOW`) must allow everything the
/// worker and its runtime need, `execve` first of all** (it is installed right before exec),
/// then whatever the dynamic loader, libc and the language runtime call (`brk`, `mmap`,
/// `mprotect`, `arch_prctl`, `set_tid_address`, `rseq`, `futex`, …).
pub fn check_seccomp(spec: &SeccompSpec) -> Result<(), SandboxError> {
    compile(spec).map(|_| ())
}

/// The BPF program for `spec`, or `None` for `Off`.
pub(crate) fn compile(spec: &SeccompSpec) -> Result<Option<BpfProgram>, SandboxError> {
    let arch = native_arch();
    match spec {
        SeccompSpec::Off => Ok(None),
        SeccompSpec::Default => default_filter(&arch?).map(Some),
        SeccompSpec::Profile(path) => {
            let arch = arch?;
            let text = std::fs::read_to_string(path).map_err(|e| SandboxError::SeccompProfile {
                path: path.clone(),
                reason: format!("cannot read: {e}"),
            })?;
            let filter = parse_profile(&text, &arch, &kernel_version())
                .and_then(|p| assemble(&arch, &p))
                .map_err(|reason| SandboxError::SeccompProfile {
                    path: path.clone(),
                    reason,
                })?;
            Ok(Some(filter))
        }
    }
}

/// Installs a compiled filter on the calling thread. Allocates nothing; returns the errno.
pub(crate) fn install(prog: &BpfProgram) -> Result<(), Errno> {
    match seccompiler::apply_filter(prog) {
        Ok(()) => Ok(()),
        Err(seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e)) => {
            Err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)))
        }
        Err(_) => Err(Errno::EINVAL),
    }
}

/// One rule of a syscall: conditions that must all hold (none = always) and the action.
#[derive(Debug, Clone)]
struct Rule {
    conditions: Vec<SeccompCondition>,
    action: SeccompAction,
}

/// A policy for the native architecture: what [`assemble`] turns into BPF.
#[derive(Debug)]
struct Policy {
    default: SeccompAction,
    syscalls: BTreeMap<i64, Vec<Rule>>,
}

impl Policy {
    fn add(&mut self, nr: i64, rule: Rule) {
        self.syscalls.entry(nr).or_default().push(rule);
    }
}

fn native_nr(name: &str) -> Option<i64> {
    syscalls::Sysno::from_str(name).ok().map(|s| s.id() as i64)
}

fn default_policy() -> Result<Policy, SandboxError> {
    let eperm = SeccompAction::Errno(libc::EPERM as u32);
    let mut p = Policy {
        default: SeccompAction::Allow,
        syscalls: BTreeMap::new(),
    };
    let nr = |name: &str| {
        native_nr(name)
            .ok_or_else(|| SandboxError::SeccompCompile(format!("no syscall {name} here")))
    };
    for name in DEFAULT_DENY {
        if let Some(n) = native_nr(name) {
            p.add(
                n,
                Rule {
                    conditions: vec![],
                    action: eperm.clone(),
                },
            );
        }
    }
    let cond = |arg: u8, op: SeccompCmpOp, v: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, v)
            .map_err(|e| SandboxError::SeccompCompile(e.to_string()))
    };
    // socket(AF_PACKET, …): raw link-layer access. The domain is an int: compare 32 bits.
    p.add(
        nr("socket")?,
        Rule {
            conditions: vec![cond(0, SeccompCmpOp::Eq, libc::AF_PACKET as u64)?],
            action: eperm.clone(),
        },
    );
    // clone with a namespace flag (flags are argument 0 on x86_64 and aarch64).
    for flag in CLONE_NAMESPACE_FLAGS {
        p.add(
            nr("clone")?,
            Rule {
                conditions: vec![cond(0, SeccompCmpOp::MaskedEq(flag), flag)?],
                action: eperm.clone(),
            },
        );
    }
    // clone3 passes its flags in memory, out of a filter's reach: ENOSYS makes libcs fall back
    // to clone.
    p.add(
        nr("clone3")?,
        Rule {
            conditions: vec![],
            action: SeccompAction::Errno(libc::ENOSYS as u32),
        },
    );
    Ok(p)
}

fn default_filter(arch: &Arch) -> Result<BpfProgram, SandboxError> {
    let policy = default_policy()?;
    assemble(arch, &policy).map_err(SandboxError::SeccompCompile)
}

// Classic BPF opcodes (<linux/bpf_common.h>).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// The kernel's limit on a classic BPF program.
const BPF_MAX_LEN: usize = 4096;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Lays out `policy` as one BPF program (see the module docs for the layout).
fn assemble(arch: &Arch, policy: &Policy) -> Result<BpfProgram, String> {
    let kill = u32::from(SeccompAction::KillProcess);
    let default = u32::from(policy.default.clone());
    let mut prog = vec![
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_ARCH),
        jump(BPF_JMP_JEQ_K, arch.audit, 1, 0),
        stmt(BPF_RET_K, kill),
        stmt(BPF_LD_W_ABS, SECCOMP_DATA_NR),
    ];
    if arch.target == seccompiler::TargetArch::x86_64 {
        prog.push(jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1));
        prog.push(stmt(BPF_RET_K, kill));
    }
    for (nr, rules) in &policy.syscalls {
        let nr = u32::try_from(*nr).map_err(|_| format!("syscall number {nr} out of range"))?;
        // Conditional rules first, in order; then the first unconditional one (later ones
        // could never match).
        let mut ordered: Vec<&Rule> = rules.iter().filter(|r| !r.conditions.is_empty()).collect();
        ordered.extend(rules.iter().find(|r| r.conditions.is_empty()));
        // Equal: jump into the first rule; not equal: land on its "skip" jump, which hops
        // rule by rule past this syscall's final `ret default`.
        prog.push(jump(BPF_JMP_JEQ_K, nr, 0, 1));
        for rule in ordered {
            if rule.conditions.is_empty() {
                prog.push(stmt(BPF_JMP_JA, 1));
                prog.push(stmt(BPF_JMP_JA, 2));
            } else {
                let r = SeccompRule::new(rule.conditions.clone()).map_err(|e| e.to_string())?;
                let bpf: BpfProgram = r.into();
                prog.extend(bpf);
            }
            prog.push(stmt(BPF_RET_K, u32::from(rule.action.clone())));
        }
        prog.push(stmt(BPF_RET_K, default));
    }
    prog.push(stmt(BPF_RET_K, default));
    if prog.len() >= BPF_MAX_LEN {
        return Err(format!(
            "the filter has {} BPF instructions, the kernel takes fewer than {BPF_MAX_LEN}",
            prog.len()
        ));
    }
    Ok(prog)
}

// ---- OCI / Docker profiles ----------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Profile {
    default_action: String,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Option<Vec<String>>,
    /// Docker: the architectures a profile applies to with their sub-architectures. Ignored:
    /// the filter is for the running architecture.
    #[serde(default)]
    arch_map: Option<serde_json::Value>,
    /// OCI filter flags (`SECCOMP_FILTER_FLAG_LOG`, …). Ignored.
    #[serde(default)]
    flags: Option<Vec<String>>,
    #[serde(default)]
    listener_path: Option<String>,
    #[serde(default)]
    listener_metadata: Option<String>,
    #[serde(default)]
    syscalls: Option<Vec<Entry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Entry {
    #[serde(default)]
    names: Option<Vec<String>>,
    /// Old Docker profiles: one name per entry.
    #[serde(default)]
    name: Option<String>,
    action: String,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Option<Vec<Arg>>,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    includes: Option<Filter>,
    #[serde(default)]
    excludes: Option<Filter>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Arg {
    index: u8,
    value: u64,
    #[serde(default)]
    value_two: u64,
    op: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Filter {
    #[serde(default)]
    arches: Option<Vec<String>>,
    #[serde(default)]
    caps: Option<Vec<String>>,
    #[serde(default)]
    min_kernel: Option<String>,
}

const KNOWN_SCMP_ARCHES: &[&str] = &[
    "SCMP_ARCH_X86",
    "SCMP_ARCH_X86_64",
    "SCMP_ARCH_X32",
    "SCMP_ARCH_ARM",
    "SCMP_ARCH_AARCH64",
    "SCMP_ARCH_MIPS",
    "SCMP_ARCH_MIPS64",
    "SCMP_ARCH_MIPS64N32",
    "SCMP_ARCH_MIPSEL",
    "SCMP_ARCH_MIPSEL64",
    "SCMP_ARCH_MIPSEL64N32",
    "SCMP_ARCH_PPC",
    "SCMP_ARCH_PPC64",
    "SCMP_ARCH_PPC64LE",
    "SCMP_ARCH_S390",
    "SCMP_ARCH_S390X",
    "SCMP_ARCH_PARISC",
    "SCMP_ARCH_PARISC64",
    "SCMP_ARCH_RISCV64",
    "SCMP_ARCH_LOONGARCH64",
];

/// ARM's private syscalls (`__ARM_NR_*`), named in Docker's profile, in no syscall table.
const ARM_PRIVATE: &[&str] = &["breakpoint", "cacheflush", "set_tls", "usr26", "usr32"];

fn known_on_some_arch(name: &str) -> bool {
    macro_rules! any_table {
        ($($arch:ident),*) => { false $(|| syscalls::$arch::Sysno::from_str(name).is_ok())* };
    }
    any_table!(
        x86_64,
        x86,
        aarch64,
        arm,
        riscv64,
        riscv32,
        s390x,
        powerpc,
        powerpc64,
        mips,
        mips64,
        loongarch64,
        sparc,
        sparc64
    ) || ARM_PRIVATE.contains(&name)
}

fn kernel_version() -> (u32, u32) {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .and_then(|s| parse_version(s.trim()))
        .unwrap_or((0, 0))
}

fn parse_version(s: &str) -> Option<(u32, u32)> {
    let mut it = s.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn parse_action(name: &str, errno: Option<u32>) -> Result<SeccompAction, String> {
    let errno = errno.unwrap_or(libc::EPERM as u32);
    Ok(match name {
        "SCMP_ACT_ALLOW" => SeccompAction::Allow,
        "SCMP_ACT_ERRNO" => SeccompAction::Errno(errno),
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => SeccompAction::KillThread,
        "SCMP_ACT_KILL_PROCESS" => SeccompAction::KillProcess,
        "SCMP_ACT_TRAP" => SeccompAction::Trap,
        "SCMP_ACT_LOG" => SeccompAction::Log,
        "SCMP_ACT_TRACE" => SeccompAction::Trace(errno),
        "SCMP_ACT_NOTIFY" => return Err("action SCMP_ACT_NOTIFY is not supported".into()),
        other => return Err(format!("unknown action {other:?}")),
    })
}

fn parse_condition(a: &Arg) -> Result<SeccompCondition, String> {
    let (op, value) = match a.op.as_str() {
        "SCMP_CMP_EQ" => (SeccompCmpOp::Eq, a.value),
        "SCMP_CMP_NE" => (SeccompCmpOp::Ne, a.value),
        "SCMP_CMP_LT" => (SeccompCmpOp::Lt, a.value),
        "SCMP_CMP_LE" => (SeccompCmpOp::Le, a.value),
        "SCMP_CMP_GT" => (SeccompCmpOp::Gt, a.value),
        "SCMP_CMP_GE" => (SeccompCmpOp::Ge, a.value),
        // libseccomp: value is the mask, valueTwo the datum.
        "SCMP_CMP_MASKED_EQ" => (SeccompCmpOp::MaskedEq(a.value), a.value_two),
        other => return Err(format!("unknown argument operator {other:?}")),
    };
    if a.index > 5 {
        return Err(format!("argument index {} (0 to 5)", a.index));
    }
    SeccompCondition::new(a.index, SeccompCmpArgLen::Qword, op, value).map_err(|e| e.to_string())
}

/// Whether a Docker `includes`/`excludes` pair lets an entry apply here.
fn applies(e: &Entry, arch: &Arch, kernel: (u32, u32)) -> Result<bool, String> {
    let arch_in = |f: &Filter| {
        f.arches
            .as_ref()
            .is_some_and(|a| a.iter().any(|x| x == arch.go_name || x == arch.scmp_name))
    };
    if let Some(inc) = &e.includes {
        if inc.arches.as_ref().is_some_and(|a| !a.is_empty()) && !arch_in(inc) {
            return Ok(false);
        }
        if inc.caps.as_ref().is_some_and(|c| !c.is_empty()) {
            return Ok(false);
        }
        if let Some(min) = &inc.min_kernel {
            let min = parse_version(min).ok_or_else(|| format!("minKernel {min:?}"))?;
            if kernel < min {
                return Ok(false);
            }
        }
    }
    if let Some(exc) = &e.excludes
        && arch_in(exc)
    {
        return Ok(false);
    }
    Ok(true)
}

/// Parses an OCI/Docker profile into a policy for `arch`. Errors name what is wrong; the
/// caller adds the path.
fn parse_profile(text: &str, arch: &Arch, kernel: &(u32, u32)) -> Result<Policy, String> {
    let p: Profile = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let _ = (&p.arch_map, &p.flags, &p.listener_metadata);
    if p.listener_path.as_deref().is_some_and(|l| !l.is_empty()) {
        return Err("listenerPath (SCMP_ACT_NOTIFY) is not supported".into());
    }
    for a in p.architectures.iter().flatten() {
        if !KNOWN_SCMP_ARCHES.contains(&a.as_str()) {
            return Err(format!("unknown architecture {a:?}"));
        }
    }
    let default = parse_action(&p.default_action, p.default_errno_ret)
        .map_err(|e| format!("defaultAction: {e}"))?;
    let mut policy = Policy {
        default,
        syscalls: BTreeMap::new(),
    };
    for (i, e) in p.syscalls.iter().flatten().enumerate() {
        let ctx = |m: String| format!("syscalls[{i}]: {m}");
        let action = parse_action(&e.action, e.errno_ret).map_err(ctx)?;
        let _ = &e.comment;
        if !applies(e, arch, *kernel).map_err(ctx)? {
            continue;
        }
        let conds: Vec<SeccompCondition> = e
            .args
            .iter()
            .flatten()
            .map(parse_condition)
            .collect::<Result<_, _>>()
            .map_err(ctx)?;
        let args = e.args.as_deref().unwrap_or_default();
        let same_arg_twice = args
            .iter()
            .enumerate()
            .any(|(j, a)| args[..j].iter().any(|b| b.index == a.index));
        let rules: Vec<Rule> = if same_arg_twice {
            conds
                .into_iter()
                .map(|c| Rule {
                    conditions: vec![c],
                    action: action.clone(),
                })
                .collect()
        } else {
            vec![Rule {
                conditions: conds,
                action: action.clone(),
            }]
        };
        let names = e.names.iter().flatten().chain(e.name.iter());
        let mut any = false;
        for name in names {
            any = true;
            match native_nr(name) {
                Some(nr) => {
                    for r in &rules {
                        policy.add(nr, r.clone());
                    }
                }
                None if known_on_some_arch(name) => {}
                None => return Err(ctx(format!("unknown syscall {name:?}"))),
            }
        }
        if !any {
            return Err(ctx("no syscall names".into()));
        }
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A classic-BPF interpreter for the instructions the filters use, so the layout can be
    /// checked without installing anything.
    fn run_bpf(prog: &[sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_ne_bytes());
        data[4..8].copy_from_slice(&arch.to_ne_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let ins = &prog[pc];
            pc += 1;
            match ins.code {
                0x20 => {
                    let k = ins.k as usize;
                    acc = u32::from_ne_bytes(data[k..k + 4].try_into().unwrap());
                }
                0x54 => acc &= ins.k,
                0x05 => pc += ins.k as usize,
                0x06 => return ins.k,
                code => {
                    let taken = match code {
                        0x15 => acc == ins.k,
                        0x25 => acc > ins.k,
                        0x35 => acc >= ins.k,
                        0x45 => acc & ins.k != 0,
                        other => panic!("opcode {other:#x} not modelled"),
                    };
                    pc += if taken { ins.jt } else { ins.jf } as usize;
                }
            }
        }
    }

    fn arch() -> Arch {
        native_arch().unwrap()
    }

    fn nr(name: &str) -> u32 {
        native_nr(name).unwrap() as u32
    }

    const ALLOW: u32 = 0x7fff_0000;
    const KILL_PROCESS: u32 = 0x8000_0000;
    fn errno(e: i32) -> u32 {
        0x0005_0000 | e as u32
    }

    #[test]
    fn default_filter_compiles_and_decides_as_documented() {
        let a = arch();
        let prog = default_filter(&a).unwrap();
        let run = |name: &str, args: [u64; 6]| run_bpf(&prog, a.audit, nr(name), args);
        for name in [
            "mount",
            "ptrace",
            "unshare",
            "setns",
            "bpf",
            "fsopen",
            "io_uring_setup",
        ] {
            assert_eq!(run(name, [0; 6]), errno(libc::EPERM), "{name}");
        }
        for name in [
            "read",
            "write",
            "execve",
            "openat",
            "mmap",
            "exit_group",
            "wait4",
        ] {
            assert_eq!(run(name, [0; 6]), ALLOW, "{name}");
        }
        assert_eq!(run("clone3", [0; 6]), errno(libc::ENOSYS));
        // clone: plain fork-like flags pass, any namespace flag is refused.
        let fork_flags = (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID) as u64 | 17;
        assert_eq!(run("clone", [fork_flags, 0, 0, 0, 0, 0]), ALLOW);
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
        assert_eq!(run("clone", [thread, 0, 0, 0, 0, 0]), ALLOW);
        for f in CLONE_NAMESPACE_FLAGS {
            assert_eq!(
                run("clone", [fork_flags | f, 0, 0, 0, 0, 0]),
                errno(libc::EPERM)
            );
        }
        let packet = libc::AF_PACKET as u64;
        assert_eq!(run("socket", [packet, 3, 0, 0, 0, 0]), errno(libc::EPERM));
        assert_eq!(run("socket", [libc::AF_INET as u64, 1, 0, 0, 0, 0]), ALLOW);
        // Another architecture's syscalls, and x32 numbers on x86_64, kill.
        assert_eq!(run_bpf(&prog, 0x4000_0003, 1, [0; 6]), KILL_PROCESS);
        if a.target == seccompiler::TargetArch::x86_64 {
            assert_eq!(
                run_bpf(&prog, a.audit, 0x4000_0000 | nr("mount"), [0; 6]),
                KILL_PROCESS
            );
            // Every name of the deny-list exists on x86_64.
            for name in DEFAULT_DENY {
                assert!(native_nr(name).is_some(), "{name}");
            }
        }
        check_seccomp(&SeccompSpec::Default).unwrap();
        check_seccomp(&SeccompSpec::Off).unwrap();
    }

    const PROFILE: &str = r#"{
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 38,
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_AARCH64"],
        "syscalls": [
            { "names": ["read", "write", "execve", "chown32", "_llseek"], "action": "SCMP_ACT_ALLOW" },
            { "names": ["getpid"], "action": "SCMP_ACT_LOG" },
            { "names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1 },
            { "names": ["socket"], "action": "SCMP_ACT_ALLOW",
              "args": [ { "index": 0, "value": 40, "op": "SCMP_CMP_NE" } ] },
            { "names": ["personality"], "action": "SCMP_ACT_ALLOW",
              "args": [ { "index": 0, "value": 0, "op": "SCMP_CMP_EQ" },
                        { "index": 0, "value": 8, "op": "SCMP_CMP_EQ" } ] },
            { "names": ["clone"], "action": "SCMP_ACT_ALLOW",
              "args": [ { "index": 0, "value": 2114060288, "op": "SCMP_CMP_MASKED_EQ" } ] },
            { "names": ["mmap"], "action": "SCMP_ACT_ALLOW",
              "args": [ { "index": 2, "value": 4, "op": "SCMP_CMP_LT" },
                        { "index": 1, "value": 4096, "op": "SCMP_CMP_GE" } ] },
            { "names": ["mmap"], "action": "SCMP_ACT_KILL_PROCESS" },
            { "names": ["ptrace"], "action": "SCMP_ACT_ALLOW", "includes": { "caps": ["CAP_SYS_PTRACE"] } },
            { "names": ["arch_prctl", "riscv_flush_icache"], "action": "SCMP_ACT_ALLOW",
              "includes": { "arches": ["amd64", "arm64"] }, "comment": "native only" },
            { "names": ["s390_runtime_instr"], "action": "SCMP_ACT_ALLOW", "includes": { "arches": ["s390x"] } },
            { "names": ["uname"], "action": "SCMP_ACT_ALLOW", "includes": { "minKernel": "99.0" } },
            { "names": ["gettid"], "action": "SCMP_ACT_TRAP", "excludes": { "arches": ["ppc64le"] } }
        ]
    }"#;

    #[test]
    fn oci_profile_translates_actions_conditions_and_filters() {
        let a = arch();
        let policy = parse_profile(PROFILE, &a, &(6, 18)).unwrap();
        let prog = assemble(&a, &policy).unwrap();
        let run = |name: &str, args: [u64; 6]| run_bpf(&prog, a.audit, nr(name), args);
        assert_eq!(run("read", [0; 6]), ALLOW);
        assert_eq!(run("execve", [0; 6]), ALLOW);
        assert_eq!(run("getpid", [0; 6]), 0x7ffc_0000, "LOG");
        assert_eq!(run("kill", [0; 6]), errno(1));
        assert_eq!(
            run("openat", [0; 6]),
            errno(38),
            "default uses defaultErrnoRet"
        );
        assert_eq!(run("socket", [2, 1, 0, 0, 0, 0]), ALLOW);
        assert_eq!(run("socket", [40, 1, 0, 0, 0, 0]), errno(38));
        // Two conditions on the same argument: OR (runc).
        assert_eq!(run("personality", [0; 6]), ALLOW);
        assert_eq!(run("personality", [8, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(run("personality", [9, 0, 0, 0, 0, 0]), errno(38));
        // MASKED_EQ with valueTwo = 0: no namespace flag.
        assert_eq!(run("clone", [17, 0, 0, 0, 0, 0]), ALLOW);
        let newuser = libc::CLONE_NEWUSER as u64 | 17;
        assert_eq!(run("clone", [newuser, 0, 0, 0, 0, 0]), errno(38));
        // Different conditions AND; conditional before unconditional, each with its action.
        assert_eq!(run("mmap", [0, 8192, 3, 0, 0, 0]), ALLOW);
        assert_eq!(run("mmap", [0, 8192, 7, 0, 0, 0]), KILL_PROCESS);
        assert_eq!(run("mmap", [0, 100, 3, 0, 0, 0]), KILL_PROCESS);
        // 64-bit comparisons look at the upper half too.
        assert_eq!(run("mmap", [0, 1 << 32, 3, 0, 0, 0]), ALLOW);
        assert_eq!(run("mmap", [0, 8192, (1 << 32) | 3, 0, 0, 0]), KILL_PROCESS);
        // includes.caps: workers hold no capabilities.
        assert_eq!(run("ptrace", [0; 6]), errno(38));
        // includes.arches names the running one (Go's name) or not; minKernel; excludes.
        if a.target == seccompiler::TargetArch::x86_64 {
            assert_eq!(run("arch_prctl", [0; 6]), ALLOW);
        }
        assert_eq!(run("uname", [0; 6]), errno(38), "minKernel 99.0 is not met");
        assert_eq!(run("gettid", [0; 6]), 0x0003_0000, "TRAP");
    }

    #[test]
    fn oci_profile_errors_name_the_problem() {
        let a = arch();
        let parse = |t: &str| parse_profile(t, &a, &(6, 18)).unwrap_err();
        let e = parse(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount","no_such_call"],"action":"SCMP_ACT_ERRNO"}]}"#,
        );
        assert!(
            e.contains("\"no_such_call\"") && e.contains("syscalls[0]"),
            "{e}"
        );
        let e = parse(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_BOGUS"}]}"#,
        );
        assert!(e.contains("SCMP_ACT_BOGUS"), "{e}");
        let e = parse(r#"{"defaultAction":"SCMP_ACT_NOPE"}"#);
        assert!(
            e.contains("defaultAction") && e.contains("SCMP_ACT_NOPE"),
            "{e}"
        );
        let e = parse(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mount"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":1,"op":"SCMP_CMP_ALMOST"}]}]}"#,
        );
        assert!(e.contains("SCMP_CMP_ALMOST"), "{e}");
        let e = parse(r#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_Z80"]}"#);
        assert!(e.contains("SCMP_ARCH_Z80"), "{e}");
        let e = parse(r#"{"defaultAction":"SCMP_ACT_ALLOW","defaultActon":"x"}"#);
        assert!(e.contains("defaultActon"), "{e}");

        // Through check_seccomp, the error names the file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        std::fs::write(&path, r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["frobnicate"],"action":"SCMP_ACT_ERRNO"}]}"#).unwrap();
        let e = check_seccomp(&SeccompSpec::Profile(path.clone()))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("frobnicate"),
            "{e}"
        );
        let missing = dir.path().join("missing.json");
        let e = check_seccomp(&SeccompSpec::Profile(missing.clone()))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&missing.display().to_string()), "{e}");
    }

    /// Runs `child` in a forked child and returns its exit code (bounded wait, kill by pid).
    /// `child` must only make raw syscalls: the test harness is multi-threaded.
    fn in_forked_child(child: fn() -> i32) -> i32 {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        // SAFETY: the child runs `child`, which only makes async-signal-safe raw syscalls,
        // then _exit: nothing that could deadlock on a lock held by another thread.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            super::super::sys::exit_now(child());
        }
        let pid = nix::unistd::Pid::from_raw(pid);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)).unwrap() {
                WaitStatus::Exited(_, code) => return code,
                WaitStatus::StillAlive => {}
                other => panic!("child ended with {other:?}"),
            }
            if std::time::Instant::now() > deadline {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = waitpid(pid, None);
                panic!("forked child did not finish in 10 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    fn errno_now() -> i32 {
        // SAFETY: __errno_location returns this thread's errno slot.
        unsafe { *libc::__errno_location() }
    }

    static DEFAULT_PROG: std::sync::OnceLock<BpfProgram> = std::sync::OnceLock::new();

    #[test]
    fn default_filter_installed_in_a_forked_child() {
        DEFAULT_PROG.get_or_init(|| default_filter(&arch()).unwrap());
        let code = in_forked_child(|| {
            let prog = DEFAULT_PROG.get().unwrap();
            if install(prog).is_err() {
                return 2;
            }
            // SAFETY: raw syscalls with null/zero arguments; each is refused by the filter
            // before the kernel looks at them, or is harmless (getpid, socket, close).
            unsafe {
                if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != -1 || errno_now() != libc::EPERM {
                    return 10;
                }
                let null = std::ptr::null::<libc::c_char>();
                if libc::mount(null, c"/".as_ptr(), null, 0, std::ptr::null()) != -1
                    || errno_now() != libc::EPERM
                {
                    return 11;
                }
                if libc::unshare(libc::CLONE_NEWNS) != -1 || errno_now() != libc::EPERM {
                    return 12;
                }
                if libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) != -1
                    || errno_now() != libc::EPERM
                {
                    return 13;
                }
                if libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0) != -1
                    || errno_now() != libc::ENOSYS
                {
                    return 14;
                }
                if libc::getpid() <= 0 {
                    return 15;
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if fd < 0 {
                    return 16;
                }
                libc::close(fd);
                // Seccomp mode 2 is what /proc/self/status shows; prctl tells the same.
                if libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) != 2 {
                    return 17;
                }
            }
            0
        });
        assert_eq!(
            code, 0,
            "check {code} failed in the filtered child (see the test)"
        );
    }

    #[test]
    fn unusual_names_of_docker_profiles_are_known() {
        // Names from Docker's default profile that are not x86_64 syscalls, or are new: each
        // must resolve here or be known on another architecture (then skipped).
        for name in [
            "_llseek",
            "_newselect",
            "chown32",
            "fcntl64",
            "fstatat64",
            "mmap2",
            "socketcall",
            "ugetrlimit",
            "waitpid",
            "sigreturn",
            "send",
            "recv",
            "stime",
            "sync_file_range2",
            "swapcontext",
            "arm_fadvise64_64",
            "arm_sync_file_range",
            "breakpoint",
            "cacheflush",
            "set_tls",
            "s390_pci_mmio_read",
            "s390_runtime_instr",
            "riscv_flush_icache",
            "clock_gettime64",
            "futex_time64",
            "epoll_ctl_old",
            "memfd_secret",
            "futex_waitv",
            "process_mrelease",
            "set_mempolicy_home_node",
            "landlock_restrict_self",
        ] {
            assert!(
                native_nr(name).is_some() || known_on_some_arch(name),
                "{name} unknown"
            );
        }
        assert!(!known_on_some_arch("frobnicate"));
    }

    #[test]
    fn parse_version_reads_kernel_releases() {
        assert_eq!(parse_version("6.18.44-fc-v657"), Some((6, 18)));
        assert_eq!(parse_version("4.8"), Some((4, 8)));
        assert_eq!(parse_version("x"), None);
        assert!(kernel_version() >= (3, 0));
    }
}
