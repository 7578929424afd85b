//! `probe` — a worker that reports the sandbox it runs in, as seen from inside.
//!
//! tqproxy's isolation tests start it under a worker config and compare what it reports with
//! that config (youki's habit: verify isolation from inside). It follows the worker contract
//! (DESIGN.md, "Worker contract") through the worker kit (`workers/kit`).
//!
//! | request            | answer                                                                  |
//! |--------------------|-------------------------------------------------------------------------|
//! | `GET /`            | JSON: credentials, no_new_privs, seccomp, cgroups and their limits, rlimits, pids, hostname, namespaces, interfaces, mounts, cwd, env |
//! | `GET /read?path=P` | `{"path","readable","error","is_dir"}`: can P be read (a dir: listed)?   |
//! | `GET /write?path=P`| `{"path","writable","error"}`: can P be created/appended to?             |
//! | `GET /health`      | `ok`                                                                    |
//!
//! Anything unreadable becomes `null` with a line in the report's `errors` list.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};

use serde_json::{Value, json};

use kit::{Handler, Reply, Request, query_param, url_decode};

/// v1 reports "no limit" as a huge number (`PAGE_COUNTER_MAX` pages, or `i64::MAX`).
const V1_UNLIMITED: u64 = 1 << 62;

fn main() {
    let worker = kit::Worker::from_env("probe");
    kit::serve(worker, Probe)
}

// ---------------------------------------------------------------------------------------------
// Endpoints

struct Probe;

impl Handler for Probe {
    type After = ();

    async fn handle(&self, req: &Request) -> Reply {
        let path = query_param(&req.query, "path").map(url_decode);
        match (req.path.as_str(), path) {
            ("/", _) => Reply::json(report()),
            ("/read", Some(p)) => Reply::json(try_read(&p)),
            ("/write", Some(p)) => Reply::json(try_write(&p)),
            ("/read" | "/write", None) => Reply::text(400, "path=P is required\n"),
            _ => Reply::text(404, "not found\n"),
        }
    }
}

fn err_str(e: impl std::fmt::Display) -> Value {
    Value::String(e.to_string())
}

fn try_read(path: &str) -> Value {
    let is_dir = std::fs::metadata(path).is_ok_and(|m| m.is_dir());
    let result = if is_dir {
        std::fs::read_dir(path).map(drop)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read(&mut [0u8; 1]).map(drop))
    };
    let error = result.err().map_or(Value::Null, err_str);
    json!({"path": path, "readable": error.is_null(), "error": error, "is_dir": is_dir})
}

fn try_write(path: &str) -> Value {
    let result = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(b"probe\n"));
    let error = result.err().map_or(Value::Null, err_str);
    json!({"path": path, "writable": error.is_null(), "error": error})
}

/// Collects the `GET /` report; whatever cannot be read is `null` plus a line in `errors`.
fn report() -> Value {
    use nix::sys::resource::{Resource, getrlimit};
    use nix::unistd;
    let mut errors: Vec<String> = Vec::new();
    let mut read = |path: &str| match std::fs::read_to_string(path) {
        Ok(s) => Some(s),
        Err(e) => {
            errors.push(format!("{path}: {e}"));
            None
        }
    };
    let status = read("/proc/self/status").unwrap_or_default();
    let cgroup = read("/proc/self/cgroup").unwrap_or_default();
    let mountinfo = read("/proc/self/mountinfo").unwrap_or_default();
    let field = |key: &str| status_field(&status, key);
    let field_u32 = |key: &str| field(key).and_then(|v| v.parse::<u32>().ok());

    let mut limit = |controller: &str, v1_file: &str, v2_file: &str| -> Option<String> {
        let (dir, v1) = cgroup_dir(&cgroup, &mountinfo, controller)?;
        let file = format!("{dir}/{}", if v1 { v1_file } else { v2_file });
        match std::fs::read_to_string(&file) {
            Ok(s) => Some(s.trim().to_string()),
            Err(e) => {
                errors.push(format!("{controller}: {file}: {e}"));
                None
            }
        }
    };
    let memory_limit =
        limit("memory", "memory.limit_in_bytes", "memory.max").and_then(|v| parse_limit(&v));
    let pids_max = limit("pids", "pids.max", "pids.max").and_then(|v| parse_limit(&v));
    let cpu_quota = match cgroup_dir(&cgroup, &mountinfo, "cpu") {
        Some((_, true)) => {
            let quota = limit("cpu", "cpu.cfs_quota_us", "");
            let period = limit("cpu", "cpu.cfs_period_us", "");
            quota
                .zip(period)
                .and_then(|(q, p)| parse_cpu_max(&format!("{q} {p}")))
        }
        Some((_, false)) => limit("cpu", "", "cpu.max").and_then(|v| parse_cpu_max(&v)),
        None => None,
    };
    let cpu_quota = cpu_quota.map(|(q, p)| json!({"quota_us": q, "period_us": p}));

    let mut rlimit = |r: Resource, name: &str| match getrlimit(r) {
        Ok((soft, hard)) => json!([soft, hard]),
        Err(e) => {
            errors.push(format!("getrlimit({name}): {e}"));
            Value::Null
        }
    };
    let rlimit_nofile = rlimit(Resource::RLIMIT_NOFILE, "RLIMIT_NOFILE");
    let rlimit_core = rlimit(Resource::RLIMIT_CORE, "RLIMIT_CORE");

    let mut namespaces = serde_json::Map::new();
    for ns in ["pid", "mnt", "net", "ipc", "uts", "user", "cgroup"] {
        let path = format!("/proc/self/ns/{ns}");
        let value = match std::fs::read_link(&path) {
            Ok(t) => Value::String(t.to_string_lossy().into_owned()),
            Err(e) => {
                errors.push(format!("{path}: {e}"));
                Value::Null
            }
        };
        namespaces.insert(ns.into(), value);
    }

    let interfaces = match std::fs::read_to_string("/proc/self/net/dev") {
        Ok(dev) => net_dev_interfaces(&dev),
        Err(e) => {
            errors.push(format!("/proc/self/net/dev: {e}"));
            let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            names.sort();
            names
        }
    };
    let hostname = match unistd::gethostname() {
        Ok(h) => Value::String(h.to_string_lossy().into_owned()),
        Err(e) => {
            errors.push(format!("gethostname: {e}"));
            Value::Null
        }
    };
    let groups = match unistd::getgroups() {
        Ok(g) => json!(g.iter().map(|g| g.as_raw()).collect::<Vec<_>>()),
        Err(e) => {
            errors.push(format!("getgroups: {e}"));
            Value::Null
        }
    };
    let cwd = match std::env::current_dir() {
        Ok(d) => Value::String(d.to_string_lossy().into_owned()),
        Err(e) => {
            errors.push(format!("getcwd: {e}"));
            Value::Null
        }
    };
    let env: BTreeMap<&str, Option<String>> = [
        "WORKER_NAME",
        "WORKER_INSTANCE",
        "WORKER_GENERATION",
        "PORT",
        "WORKER_PORT",
        "LISTEN_FDS",
        "LISTEN_PID",
    ]
    .into_iter()
    .map(|k| (k, std::env::var(k).ok()))
    .collect();
    // Asked of the paths themselves (a mount stacked on "/" does not change our root); the
    // mountinfo entry is the fallback.
    let mounts_ro_root = match nix::sys::statvfs::statvfs("/") {
        Ok(st) => st.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY),
        Err(e) => {
            errors.push(format!("statvfs(/): {e}"));
            last_mount(&mountinfo, "/").is_some_and(|m| m.options.split(',').any(|o| o == "ro"))
        }
    };
    let tmp_is_private = match nix::sys::statfs::statfs("/tmp") {
        Ok(st) => st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC,
        Err(e) => {
            errors.push(format!("statfs(/tmp): {e}"));
            last_mount(&mountinfo, "/tmp").is_some_and(|m| m.fstype == "tmpfs")
        }
    };
    json!({
        "uid": unistd::getuid().as_raw(),
        "gid": unistd::getgid().as_raw(),
        "euid": unistd::geteuid().as_raw(),
        "egid": unistd::getegid().as_raw(),
        "groups": groups,
        "no_new_privs": field("NoNewPrivs") == Some("1"),
        "seccomp": field_u32("Seccomp").unwrap_or(0),
        "seccomp_filters": field_u32("Seccomp_filters").unwrap_or(0),
        "cap_eff": field("CapEff"),
        "cgroups": cgroup.lines().collect::<Vec<_>>(),
        "memory_limit_bytes": memory_limit,
        "pids_max": pids_max,
        "cpu_quota": cpu_quota,
        "rlimit_nofile": rlimit_nofile,
        "rlimit_core": rlimit_core,
        "sched_policy": sched_policy(),
        "pid": std::process::id(),
        "ppid": unistd::getppid().as_raw(),
        "hostname": hostname,
        "namespaces": namespaces,
        "interfaces": interfaces,
        "mounts_ro_root": mounts_ro_root,
        "tmp_is_private": tmp_is_private,
        "cwd": cwd,
        "env": env,
        "errors": errors,
    })
}

// ---------------------------------------------------------------------------------------------
// Parsing helpers (pure)

/// The value of `key:` in /proc/self/status (e.g. `Seccomp:\t2` → `2`).
fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k == key).then(|| v.trim())
    })
}

/// One line of /proc/self/cgroup: `4:memory:/a/b` → (4, ["memory"], "/a/b").
fn parse_cgroup_line(line: &str) -> Option<(u32, Vec<&str>, &str)> {
    let mut parts = line.splitn(3, ':');
    let id = parts.next()?.parse().ok()?;
    let controllers = parts.next()?;
    let path = parts.next()?;
    let controllers = controllers.split(',').filter(|c| !c.is_empty()).collect();
    Some((id, controllers, path))
}

/// One line of /proc/self/mountinfo (only the fields the probe needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mount<'a> {
    root: &'a str,
    mount_point: &'a str,
    options: &'a str,
    fstype: &'a str,
    super_options: &'a str,
}

/// `36 35 98:0 /root /mnt rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
fn parse_mountinfo_line(line: &str) -> Option<Mount<'_>> {
    let (before, after) = line.split_once(" - ")?;
    let mut f = before.split(' ');
    let (_id, _parent, _dev) = (f.next()?, f.next()?, f.next()?);
    let (root, mount_point, options) = (f.next()?, f.next()?, f.next()?);
    let mut a = after.split(' ');
    let (fstype, _source) = (a.next()?, a.next()?);
    Some(Mount {
        root,
        mount_point,
        options,
        fstype,
        super_options: a.next().unwrap_or(""),
    })
}

/// The mount that is visible at `mount_point` (the last one mounted there).
fn last_mount<'a>(mountinfo: &'a str, mount_point: &str) -> Option<Mount<'a>> {
    mountinfo
        .lines()
        .filter_map(parse_mountinfo_line)
        .rfind(|m| m.mount_point == mount_point)
}

/// The cgroup directory holding `controller`'s files for this process, and whether it is v1.
///
/// A v1 line naming the controller wins (hybrid hosts also have a `0::` line for an empty
/// cgroup2); the mount point comes from mountinfo, else `/sys/fs/cgroup[/<controller>]`.
fn cgroup_dir(cgroup: &str, mountinfo: &str, controller: &str) -> Option<(String, bool)> {
    let lines: Vec<_> = cgroup.lines().filter_map(parse_cgroup_line).collect();
    let mounts: Vec<_> = mountinfo.lines().filter_map(parse_mountinfo_line).collect();
    let join = |mount: Option<&Mount>, default: String, path: &str| {
        let (base, root) = mount.map_or((default, "/"), |m| (m.mount_point.to_string(), m.root));
        let rel = match path.strip_prefix(root) {
            Some(rest) if root != "/" => rest,
            _ => path,
        };
        format!(
            "{}/{}",
            base.trim_end_matches('/'),
            rel.trim_start_matches('/')
        )
        .trim_end_matches('/')
        .to_string()
    };
    if let Some((_, _, path)) = lines
        .iter()
        .find(|(id, c, _)| *id != 0 && c.contains(&controller))
    {
        let mount = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.super_options.split(',').any(|o| o == controller));
        return Some((
            join(mount, format!("/sys/fs/cgroup/{controller}"), path),
            true,
        ));
    }
    let (_, _, path) = lines.iter().find(|(id, c, _)| *id == 0 && c.is_empty())?;
    let mount = mounts.iter().find(|m| m.fstype == "cgroup2");
    Some((join(mount, "/sys/fs/cgroup".to_string(), path), false))
}

/// `memory.max`/`pids.max`/`memory.limit_in_bytes` → bytes or count; "max" and huge v1 values
/// (≥ 2^62) mean unlimited → `None`.
fn parse_limit(v: &str) -> Option<u64> {
    v.trim().parse::<u64>().ok().filter(|n| *n < V1_UNLIMITED)
}

/// `cpu.max` ("50000 100000", "max 100000") or v1 "quota period" (quota -1 = none).
fn parse_cpu_max(v: &str) -> Option<(i64, u64)> {
    let (quota, period) = v.trim().split_once(' ')?;
    let quota: i64 = quota.parse().ok().filter(|q| *q >= 0)?;
    Some((quota, period.trim().parse().ok()?))
}

/// Interface names from /proc/net/dev (two header lines, then `  name: counters`).
fn net_dev_interfaces(dev: &str) -> Vec<String> {
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim().to_string())
        .collect()
}

/// This process's scheduling policy by name, from field 41 of `/proc/self/stat` (after the
/// `)` that ends the command name).
fn sched_policy() -> Option<&'static str> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    // Field 3 (state) is the first after the name; the policy is field 41.
    let policy: u32 = after.split(' ').nth(41 - 3)?.parse().ok()?;
    Some(match policy {
        0 => "other",
        1 => "fifo",
        2 => "rr",
        3 => "batch",
        5 => "idle",
        6 => "deadline",
        _ => "unknown",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let status = "Name:\tprobe\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        assert_eq!(status_field(status, "Seccomp"), Some("2"));
        assert_eq!(status_field(status, "Seccomp_filters"), Some("1"));
        assert_eq!(status_field(status, "NoNewPrivs"), Some("1"));
        assert_eq!(status_field(status, "Missing"), None);
    }

    #[test]
    fn cgroup_lines() {
        assert_eq!(
            parse_cgroup_line("4:memory:/a/b"),
            Some((4, vec!["memory"], "/a/b"))
        );
        assert_eq!(
            parse_cgroup_line("3:cpu,cpuacct:/x:y"),
            Some((3, vec!["cpu", "cpuacct"], "/x:y"))
        );
        assert_eq!(parse_cgroup_line("0::/w/i-1"), Some((0, vec![], "/w/i-1")));
        assert_eq!(parse_cgroup_line("garbage"), None);
    }

    const HYBRID_CGROUP: &str =
        "9:name=systemd:/\n8:pids:/tq/w\n4:memory:/tq/w\n2:cpu,cpuacct:/tq/w\n0::/\n";
    const HYBRID_MOUNTS: &str = "\
25 1 0:22 / / ro,relatime - overlay overlay rw\n\
30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
31 25 0:27 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n\
32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
40 25 0:40 / /tmp rw,nosuid - tmpfs tmpfs rw,size=65536k\n";

    #[test]
    fn cgroup_dirs_v1_hybrid_and_v2() {
        let dir = |c, m, ctl| cgroup_dir(c, m, ctl);
        assert_eq!(
            dir(HYBRID_CGROUP, HYBRID_MOUNTS, "memory"),
            Some(("/sys/fs/cgroup/memory/tq/w".to_string(), true))
        );
        assert_eq!(
            dir(HYBRID_CGROUP, HYBRID_MOUNTS, "cpu"),
            Some(("/sys/fs/cgroup/cpu,cpuacct/tq/w".to_string(), true))
        );
        // No mountinfo entry for pids: the conventional place.
        assert_eq!(
            dir(HYBRID_CGROUP, HYBRID_MOUNTS, "pids"),
            Some(("/sys/fs/cgroup/pids/tq/w".to_string(), true))
        );
        let v2_mounts = "22 1 0:20 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            dir("0::/tq/w/i-1\n", v2_mounts, "memory"),
            Some(("/sys/fs/cgroup/tq/w/i-1".to_string(), false))
        );
        // A cgroup namespace mount whose root is the worker's own cgroup.
        let ns_mount = "22 1 0:20 /tq/w /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            dir("0::/tq/w/i-1\n", ns_mount, "pids"),
            Some(("/sys/fs/cgroup/i-1".to_string(), false))
        );
        assert_eq!(
            dir("0::/\n", "", "memory"),
            Some(("/sys/fs/cgroup".to_string(), false))
        );
        assert_eq!(dir("", "", "memory"), None);
    }

    #[test]
    fn limits() {
        assert_eq!(parse_limit("max"), None);
        assert_eq!(parse_limit("268435456\n"), Some(268_435_456));
        assert_eq!(parse_limit("9223372036854771712"), None);
        assert_eq!(parse_cpu_max("max 100000"), None);
        assert_eq!(parse_cpu_max("50000 100000\n"), Some((50_000, 100_000)));
        assert_eq!(parse_cpu_max("-1 100000"), None);
    }

    #[test]
    fn mounts() {
        assert!(last_mount(HYBRID_MOUNTS, "/").is_some_and(|m| m.options.starts_with("ro")));
        assert_eq!(
            last_mount(HYBRID_MOUNTS, "/tmp").map(|m| m.fstype),
            Some("tmpfs")
        );
        assert_eq!(last_mount(HYBRID_MOUNTS, "/var"), None);
        let optional = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 shared:2 - ext3 /dev/root rw,errors=continue";
        let m = parse_mountinfo_line(optional).unwrap();
        assert_eq!(
            (m.root, m.mount_point, m.fstype),
            ("/mnt1", "/mnt2", "ext3")
        );
        assert_eq!(m.super_options, "rw,errors=continue");
    }

    #[test]
    fn interfaces() {
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 1 2 3\n  eth0: 4 5 6\n";
        assert_eq!(net_dev_interfaces(dev), vec!["lo", "eth0"]);
    }
}
