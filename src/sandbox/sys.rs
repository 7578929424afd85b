//! Thin wrappers over the raw system calls that neither std nor nix wrap (or wrap in a way
//! that does not fit): every `unsafe` of the helper that is not about fork lives here.

use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

/// `struct mount_attr` of `<linux/mount.h>`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

pub(crate) const MOUNT_ATTR_RDONLY: u64 = 0x1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// `mount_setattr(AT_FDCWD, path, AT_RECURSIVE?, {attr_set, attr_clr})`. `ENOSYS` on kernels
/// before 5.12: callers fall back to bind remounts.
pub(crate) fn mount_setattr(
    path: &CStr,
    recursive: bool,
    attr_set: u64,
    attr_clr: u64,
) -> Result<(), Errno> {
    let attr = MountAttr {
        attr_set,
        attr_clr,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: `path` is a valid NUL-terminated string and `attr` a properly initialised
    // `struct mount_attr` whose size we pass; the kernel only reads both during the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc == 0 { Ok(()) } else { Err(Errno::last()) }
}

/// Marks every fd from `first` up as close-on-exec (`close_range(first, ~0,
/// CLOSE_RANGE_CLOEXEC)`), falling back to `/proc/self/fd` on kernels before 5.11.
pub(crate) fn cloexec_from(first: RawFd) -> Result<(), Errno> {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on open fds; no memory is
    // passed to the kernel.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = Errno::last();
    if err != Errno::ENOSYS && err != Errno::EINVAL {
        return Err(err);
    }
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= first)
        .collect();
    for fd in fds {
        // The directory fd of read_dir is gone by now: EBADF is expected for it.
        match set_cloexec(fd, true) {
            Ok(()) | Err(Errno::EBADF) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sets or clears `FD_CLOEXEC` on `fd`.
pub(crate) fn set_cloexec(fd: RawFd, on: bool) -> Result<(), Errno> {
    // SAFETY: fcntl(F_GETFD/F_SETFD) on an integer fd touches no memory; a closed fd yields
    // EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(Errno::last());
    }
    let new = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    if new != flags && unsafe { libc::fcntl(fd, libc::F_SETFD, new) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Brings the loopback interface of the current network namespace up
/// (`SIOCGIFFLAGS`/`SIOCSIFFLAGS` with `IFF_UP` on an `AF_INET` datagram socket).
pub(crate) fn loopback_up() -> Result<(), Errno> {
    // SAFETY: plain socket(2) call; the returned fd is checked and owned right after.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `raw` is a fresh fd that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `ifreq` is a plain C struct for which all-zero bytes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the NUL-terminated name and writes the flags into `ifr`,
    // which lives for the whole call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) } < 0 {
        return Err(Errno::last());
    }
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS only reads `ifr`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

/// The Landlock ABI version of the running kernel (`landlock_create_ruleset(NULL, 0,
/// LANDLOCK_CREATE_RULESET_VERSION)`), or `None`.
pub(crate) fn landlock_abi() -> Option<i32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1 << 0;
    // SAFETY: with a NULL attribute pointer and size 0 the kernel reads no memory and only
    // returns the ABI version (or an error).
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    (v > 0).then_some(v as i32)
}

/// The kernel's `struct sigaction` (x86_64 and aarch64 both have `sa_restorer`).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// Sets every signal's disposition to `SIG_DFL` (exec keeps ignored signals ignored: tqproxy
/// ignores SIGPIPE, and glibc's own signals 32 and 33 can arrive ignored too). Raw
/// `rt_sigaction`, since glibc refuses to touch its internal signals.
pub(crate) fn reset_signal_dispositions() {
    let max = libc::SIGRTMAX();
    let dfl = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=max {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: `dfl` is a valid kernel sigaction describing SIG_DFL (no handler code runs);
        // the old action is not requested; 8 is the kernel's sigset size.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &dfl as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            )
        };
    }
}

/// SIGPIPE back to its default (the process ends, quietly) for the CLI's client verbs: the
/// Rust runtime ignores it, and then `tqproxy status | head` made `println!` panic on EPIPE.
/// Never for `run`, which must see EPIPE on a client's socket as an error.
pub fn default_sigpipe() {
    // SAFETY: SIG_DFL installs no handler (no code runs in signal context); called from the
    // main thread before any other thread exists that could race on the disposition.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// Sets this process's CPU scheduling policy (priority 0; allowed to an unprivileged process
/// for SCHED_OTHER, SCHED_BATCH and SCHED_IDLE).
pub(crate) fn set_cpu_scheduling(policy: super::CpuScheduling) -> nix::Result<()> {
    let policy = match policy {
        super::CpuScheduling::Other => libc::SCHED_OTHER,
        super::CpuScheduling::Batch => libc::SCHED_BATCH,
        super::CpuScheduling::Idle => libc::SCHED_IDLE,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, initialised sched_param that outlives the call; pid 0 is
    // this process; the call reads the struct and changes nothing in our address space.
    let r = unsafe { libc::sched_setscheduler(0, policy, &param) };
    nix::errno::Errno::result(r).map(drop)
}

/// Closes fd 3, the listening socket, in the relay and init, which must not hold it. Only call
/// it when the spec passes a listening socket (fd 3 is then taken, so no pipe of ours is 3).
pub(crate) fn close_listen_fd() {
    // SAFETY: with a listening socket, fd 3 is that socket, inherited and owned by no Rust
    // object in the helper (it is only passed on by exec): closing it invalidates nothing.
    unsafe { libc::close(3) };
}

/// Writes all of `buf` to `fd` with raw write(2) calls: no allocation, usable after seccomp.
pub(crate) fn write_all_raw(fd: RawFd, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: `buf` is a valid slice for `buf.len()` bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            if Errno::last() == Errno::EINTR {
                continue;
            }
            return;
        }
        if n == 0 {
            return;
        }
        buf = &buf[n as usize..];
    }
}

/// `_exit(code)`: no atexit handlers, no stdio flushing (the helper forks).
pub(crate) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions and does not return.
    unsafe { libc::_exit(code) }
}

/// Writes `tqproxy-sandbox: <step>: <program>: <strerror(errno)> (os error N)` without
/// allocating (the seccomp filter may forbid brk/mmap by then) and exits with
/// `HELPER_FAILED`.
pub(crate) fn fail_noalloc(step: &str, subject: &CStr, errno: i32) -> ! {
    let mut msg = [0u8; 256];
    // SAFETY: `msg` is a writable buffer of the length passed; the XSI strerror_r that the
    // libc crate binds writes a NUL-terminated string into it.
    let rc = unsafe { libc::strerror_r(errno, msg.as_mut_ptr().cast(), msg.len()) };
    let text: &[u8] = if rc == 0 {
        let len = msg.iter().position(|b| *b == 0).unwrap_or(0);
        &msg[..len]
    } else {
        b"unknown error"
    };
    let mut num = [0u8; 12];
    let mut i = num.len();
    let mut v = errno.unsigned_abs();
    loop {
        i -= 1;
        num[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for part in [
        b"tqproxy-sandbox: ".as_slice(),
        step.as_bytes(),
        b": ",
        subject.to_bytes(),
        b": ",
        text,
        b" (os error ",
        &num[i..],
        b")\n",
    ] {
        write_all_raw(2, part);
    }
    exit_now(super::HELPER_FAILED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn landlock_abi_is_reported() {
        // This machine provides Landlock (ABI 7 when written); elsewhere it may be None.
        if let Some(v) = landlock_abi() {
            assert!(v >= 1);
        }
    }

    #[test]
    fn set_cloexec_round_trip() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let fd = f.as_raw_fd();
        set_cloexec(fd, false).unwrap();
        let flags = || {
            // SAFETY: F_GETFD on an fd we own touches no memory.
            unsafe { libc::fcntl(fd, libc::F_GETFD) }
        };
        assert_eq!(flags() & libc::FD_CLOEXEC, 0);
        set_cloexec(fd, true).unwrap();
        assert_ne!(flags() & libc::FD_CLOEXEC, 0);
    }
}
