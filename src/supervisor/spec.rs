//! What an instance is started with: its environment, limits and sandbox (the `SpawnSpec`),
//! its cgroup, its directories. The checks `tqproxy check` and reload run before anything
//! starts are in `config::check`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Config, WorkerConfig};
use crate::sandbox::cgroup::{self, CgroupDriver, CgroupLimits, InstanceCgroup, IoLimit};
use crate::sandbox::{Credentials, RlimitSpec, SpawnSpec};

pub(super) fn setup_cgroups(config: &Config) -> Option<Arc<CgroupDriver>> {
    use crate::config::CgroupMode;
    let mode = config.cgroups.mode;
    if mode == CgroupMode::Off {
        return None;
    }
    let detected = cgroup::detect(&config.cgroups.root);
    let h = match (mode, detected) {
        (_, None) => {
            tracing::warn!(root = %config.cgroups.root.display(), "no usable cgroup hierarchy: instances run without cgroups (no resource limits)");
            return None;
        }
        (CgroupMode::V1, Some(h @ cgroup::Hierarchy::V1 { .. }))
        | (CgroupMode::V2, Some(h @ cgroup::Hierarchy::V2 { .. }))
        | (CgroupMode::Auto, Some(h)) => h,
        (m, Some(h)) => {
            tracing::warn!(wanted = ?m, found = ?h, "configured cgroup version not found; using what is there");
            h
        }
    };
    let h = match (config.cgroups.delegated, h) {
        (true, cgroup::Hierarchy::V2 { root }) => delegated_root(&root),
        (true, h) => {
            tracing::warn!(found = ?h, "cgroups.delegated needs cgroup v2; building the tree at the root instead");
            h
        }
        (false, h) => h,
    };
    match CgroupDriver::new(h, &config.cgroups.base, &std::process::id().to_string()) {
        Ok(d) => {
            for s in d.cleanup_stale() {
                tracing::warn!(cgroup = %s, "removed a stale cgroup left by an earlier tqproxy");
            }
            tracing::info!(version = d.version(), "cgroups enabled");
            Some(Arc::new(d))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cgroups unavailable: instances run without resource limits");
            None
        }
    }
}

/// The hierarchy to build in when systemd delegated tqproxy's unit cgroup to it: that cgroup,
/// with tqproxy moved into its `supervisor` child. If tqproxy is not in a delegated cgroup,
/// it says why and builds at the hierarchy root as without delegation.
fn delegated_root(root: &Path) -> cgroup::Hierarchy {
    let own = cgroup::own_v2_cgroup().unwrap_or_default();
    match cgroup::enter_delegated(root, &own, std::process::id()) {
        Ok(unit) => {
            tracing::info!(cgroup = %unit.display(), "cgroups: building inside the delegated unit cgroup");
            cgroup::Hierarchy::V2 { root: unit }
        }
        Err(e) => {
            tracing::warn!(error = %e, own = %own, "cgroups.delegated: cannot use the unit cgroup; building the tree at the hierarchy root");
            cgroup::Hierarchy::V2 {
                root: root.to_owned(),
            }
        }
    }
}

/// Creates the worker's `read_write` directories, owned by its user, mode 0700.
pub(super) fn prepare_dirs(config: &WorkerConfig) -> Result<(), String> {
    for d in &config.sandbox.read_write {
        if !d.exists() {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700));
        }
        if let Some((uid, gid)) = config.sandbox.user.ids() {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))
                .map_err(|e| format!("cannot chown {} to {uid}:{gid}: {e}", d.display()))?;
        }
    }
    Ok(())
}

pub(super) fn cgroup_limits(c: &WorkerConfig) -> CgroupLimits {
    let r = &c.resources;
    CgroupLimits {
        memory_max: r.memory,
        memory_high: r.memory_high,
        cpu_cores: r.cpu,
        cpu_weight: r.cpu_weight,
        pids_max: r.pids,
        io: r
            .io
            .iter()
            .map(|io| IoLimit {
                device: io.numbers,
                read_bps: io.read_bps,
                write_bps: io.write_bps,
                read_iops: io.read_iops,
                write_iops: io.write_iops,
            })
            .collect(),
    }
}

/// Whether `p` is `q` or inside it.
pub(super) fn within(p: &Path, q: &Path) -> bool {
    p.starts_with(q)
}

/// `ready: notify`: `NOTIFY_SOCKET` (and with `watchdog:`, `WATCHDOG_USEC`, as systemd sets
/// it) in the environment of the instance whose socket tqproxy bound at `socket`. Inside a
/// mount namespace, where [`build_spec`] hides `run_dir` as a whole, it hides each entry of
/// `run_dir` but `notify/` instead, and each entry of `notify/` but this tqproxy's directory,
/// so the socket's path resolves in there too (the entries, as they are now: the control
/// socket, the pid file, the unix sockets' directory; all root-only besides).
pub(super) fn with_notify(spec: &mut SpawnSpec, c: &WorkerConfig, socket: &Path, run_dir: &Path) {
    spec.env
        .push(("NOTIFY_SOCKET".into(), socket.display().to_string()));
    if let Some(w) = c.watchdog {
        spec.env
            .push(("WATCHDOG_USEC".into(), w.as_micros().to_string()));
    }
    if !spec.namespaces.needs_mount_ns() {
        return;
    }
    let Some(at) = spec.mounts.hide.iter().position(|h| h == run_dir) else {
        return;
    };
    spec.mounts.hide.remove(at);
    let base = super::notify::base_dir(run_dir);
    let own = super::notify::process_dir(run_dir, std::process::id());
    for (dir, keep) in [(run_dir, &base), (base.as_path(), &own)] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p != *keep && !spec.mounts.hide.contains(&p) {
                spec.mounts.hide.push(p);
            }
        }
    }
}

/// The spawn spec of one instance: environment, limits and sandbox. `port` is `None` for a
/// `transport: unix` instance, which then gets no `PORT` or `WORKER_PORT`.
pub(super) fn build_spec(
    c: &WorkerConfig,
    id: u64,
    generation: u64,
    port: Option<u16>,
    cgroup: Option<&InstanceCgroup>,
    others: &[Arc<WorkerConfig>],
    private_dirs: &[PathBuf],
) -> SpawnSpec {
    let base = crate::config::sandbox_spec(c, id);
    let mut env = base.env.clone();
    if let Some(port) = port {
        env.push(("PORT".into(), port.to_string()));
        env.push(("WORKER_PORT".into(), port.to_string()));
    }
    env.push(("WORKER_NAME".into(), c.name.clone()));
    env.push(("WORKER_INSTANCE".into(), id.to_string()));
    env.push(("WORKER_GENERATION".into(), generation.to_string()));
    // The services: every other worker with a fixed `port` (config, not runtime state, so the
    // address holds across the service's restarts).
    env.extend(others.iter().filter_map(|o| o.service_env()));
    let sb = &c.sandbox;
    let mut mounts = base.mounts.clone();
    if base.namespaces.mount {
        // What this worker needs to see: its own directory, program, cwd and paths.
        let own: Vec<&Path> = [c.dir.as_path(), c.program.as_path(), c.cwd.as_path()]
            .into_iter()
            .chain(sb.read_write.iter().map(PathBuf::as_path))
            .chain(sb.read_only.iter().map(PathBuf::as_path))
            .collect();
        let candidates = others
            .iter()
            .flat_map(|o| {
                std::iter::once(o.dir.clone()).chain(o.sandbox.read_write.iter().cloned())
            })
            .chain(private_dirs.iter().cloned());
        for h in candidates {
            // Never hide something this worker needs (or a parent of it).
            if own.iter().any(|p| within(p, &h)) || mounts.hide.contains(&h) {
                continue;
            }
            mounts.hide.push(h);
        }
    }
    SpawnSpec {
        env,
        mounts,
        cgroup_procs: cgroup.map(|cg| cg.procs_files()).unwrap_or_default(),
        rlimits: RlimitSpec {
            open_files: c.resources.open_files,
            core: c.resources.core,
            address_space: c.resources.address_space,
            file_size: c.resources.file_size,
        },
        cpu_scheduling: c.resources.cpu_scheduling,
        credentials: sb.user.ids().map(|(uid, gid)| Credentials { uid, gid }),
        ..base
    }
}
