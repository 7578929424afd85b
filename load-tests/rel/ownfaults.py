"""Group 6 of `load-tests/reliability`: tqproxy's own faults (issue 11, item 6).

- `kill -9` of tqproxy under load, then `tqproxy run` again with the same config: no orphaned
  instance (every instance carries PR_SET_PDEATHSIG=SIGKILL; the next start removes what its
  predecessor left in its cgroups), every port free again, and the load after the restart
  succeeds. The kill window's failures are expected and reported in a row of their own.
- The logs directory on a full tmpfs: serving continues (0 failed) and the dropped worker log
  lines are counted in a metric.
- The control socket deleted under tqproxy: the CLI gives a clear error, serving continues;
  and tqproxy binds it again within about a second (checked).
"""

import os
import re
import signal
import subprocess
import time

from common import (BACKEND, REPO, Load, Row, Stack, baseline, cgroup_dirs, descendants, fmt_stats, guarded,
                    inject_leak, listening_ports, log, pid_alive, port_free, reproduce, worker_yaml)

GROUP = "ownfaults"
TITLE = "tqproxy's own faults"
CONNS = 16


def lost_text(res):
    if not res.failed:
        return "nothing"
    return (f"{res.failed} requests (non-2xx {res.non2xx} [{res.bad_codes.strip()}], socket errors c/r/w/t "
            f"{'/'.join(map(str, res.socket_errors))})")


def predecessor_cgroups(st, pid):
    """Instance cgroups still under <base>/<pid>/ (pid: a tqproxy that is gone)."""
    out = []
    for d in cgroup_dirs(st.cg_base):
        base = os.path.join(d, str(pid))
        if os.path.isdir(base):
            out += [os.path.join(base, n) for n in os.listdir(base) if os.path.isdir(os.path.join(base, n))]
            out.append(base)
    return out


def kill9(ctx):
    after_secs = ctx.secs(20, 5, ci=3)
    rep = reproduce(ctx, GROUP)
    load_desc = f"wrk -t1 -c{CONNS} keep-alive GET /, 4-instance hello"
    r1 = Row(GROUP, "kill -9 of tqproxy under load: the kill window", load_desc, "1 kill -9 of tqproxy",
             goal="no orphaned instance, every port free (failures in the window are expected)", reproduce=rep)
    r2 = Row(GROUP, "tqproxy run again after the kill -9: clients reconnect", load_desc,
             "restart of tqproxy with the same config", goal="0 failed after the restart, the predecessor's "
             "cgroups removed, nothing leaked", reproduce=rep)
    with Stack("ownkill", {"hello": worker_yaml(BACKEND, instances=4)}, cgroups=ctx.cgroups, keep=ctx.keep) as st:
        st.start({"hello": 4})
        base = baseline(st.port, ctx.secs(10, 3, ci=2), connections=CONNS)
        r1.base_p50_ms, r1.base_p99_ms = r2.base_p50_ms, r2.base_p99_ms = base.p50_ms, base.p99_ms
        load = Load(st.port, "/", connections=CONNS).start(settle=2)
        try:
            r1.start = st.stats()
            old = st.tq.pid
            inst = descendants(old)
            t_kill = time.monotonic()
            os.kill(old, signal.SIGKILL)
            st.tq.wait(timeout=10)
            gone = st.wait(lambda: not any(pid_alive(p) for p in inst), timeout=5, step=0.01)
            t_gone = time.monotonic() - t_kill
            orphans = [p for p in inst if pid_alive(p)]
            ports_held = sorted(listening_ports(st.lo, st.hi) | listening_ports(st.port, st.port))
            admin_free = port_free(st.admin)
            left_cg = predecessor_cgroups(st, old) if ctx.cgroups != "off" else []
            sock_left = os.path.exists(os.path.join(st.tmp, "run", "tqproxy.sock"))
            time.sleep(1)    # the load meets a closed port for a while
            t_restart = time.monotonic()
            st.start({"hello": 4})
            t_ready = time.monotonic() - t_restart
        finally:
            res1 = load.stop()
        r1.requests, r1.failed, r1.p50_ms, r1.p99_ms = res1.requests, res1.failed, res1.p50_ms, res1.p99_ms
        r1.end = st.stats()
        problems = []
        if orphans:
            problems.append(f"{len(orphans)} orphaned instances ({', '.join(map(str, orphans))}) alive 5 s after the kill")
        if ports_held:
            problems.append(f"ports still listening after the kill: {ports_held[:8]}")
        if not admin_free:
            problems.append(f"admin port {st.admin} still bound")
        r1.ok = not problems
        r1.lost = "; ".join(problems + ([f"{res1.failed} requests in the window (expected)"] if res1.failed else [])) \
            or "nothing"
        r1.notes = (f"{len(inst)} processes under tqproxy {old} were killed with it: all gone "
                    f"{t_gone * 1000:.0f} ms after the kill" if gone else f"{len(orphans)} of {len(inst)} survived") + \
            (f"; the dead tqproxy left {len(left_cg)} cgroup dirs under {st.cg_base}/{old}" if ctx.cgroups != "off" else "") + \
            f"; its control socket file {'was left behind' if sock_left else 'is gone'}" + \
            f"; `tqproxy run` again: 4 instances ready in {t_ready:.2f} s; window load: {res1.summary()}"
        # After the restart.
        load = Load(st.port, "/", connections=CONNS).start(settle=1)
        try:
            r2.start = st.stats()
            time.sleep(after_secs)
        finally:
            res2 = load.stop()
        r2.requests, r2.failed, r2.p50_ms, r2.p99_ms = res2.requests, res2.failed, res2.p50_ms, res2.p99_ms
        time.sleep(1)
        r2.end = st.stats()
        still_cg = predecessor_cgroups(st, old) if ctx.cgroups != "off" else []
        running = st.running_leaks()
        if ctx.inject_leak:
            inject_leak(st)
        st.stop()
        after = st.leaks()
    lost = ([lost_text(res2)] if res2.failed else []) + running + [f"after stop: {x}" for x in after] + \
        ([f"the predecessor's cgroups remain after the restart: {still_cg[:3]}"] if still_cg else [])
    r2.lost = "; ".join(lost) or "nothing"
    r2.ok = not lost
    r2.notes = (f"predecessor's cgroups: {len(left_cg)} after the kill, {len(still_cg)} after the restart"
                if ctx.cgroups != "off" else "cgroups off") + f"; load after the restart: {res2.summary()}"
    return [r1, r2]


def umount(path):
    for _ in range(3):
        if subprocess.run(["umount", path], capture_output=True).returncode == 0:
            return True
        time.sleep(0.5)
    return subprocess.run(["umount", "-l", path], capture_output=True).returncode == 0


def full_tmpfs(ctx):
    secs = ctx.secs(30, 5, ci=3)
    row = Row(GROUP, "logs directory on a full tmpfs", f"wrk -t1 -c8 keep-alive GET / for {secs} s, 2-instance "
              "python worker logging every request (PY_ACCESS_LOG=1)", "logs/ = 1 MiB tmpfs, filled before the start",
              goal="0 failed, dropped log lines counted in a metric", reproduce=reproduce(ctx, GROUP))
    py = worker_yaml(["python3", os.path.join(REPO, "workers", "py", "app.py")], instances=2,
                     env={"PY_ACCESS_LOG": "1", "PYTHONUNBUFFERED": "1"}, extra="start_timeout: 15s\n")
    with Stack("ownlogs", {"py": py}, cgroups="off", keep=ctx.keep) as st:
        logs = os.path.join(st.tmp, "logs")
        os.makedirs(logs, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tqrel-logs", logs], check=True)
        mounted = True
        try:
            # Fill it: the first write of any log line gets ENOSPC.
            with open(os.path.join(logs, "fill"), "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            df = os.statvfs(logs)
            st.start({"py": 2})
            base = baseline(st.port, ctx.secs(5, 2, ci=2), connections=8)
            row.base_p50_ms, row.base_p99_ms = base.p50_ms, base.p99_ms
            size0 = os.path.getsize(os.path.join(logs, "py.log")) if os.path.exists(os.path.join(logs, "py.log")) else 0
            m0 = st.metrics()
            load = Load(st.port, "/", connections=8).start(settle=1)
            try:
                row.start = st.stats()
                time.sleep(secs)
            finally:
                res = load.stop()
            time.sleep(1)
            m1 = st.metrics()
            row.end = st.stats()
            size1 = os.path.getsize(os.path.join(logs, "py.log")) if os.path.exists(os.path.join(logs, "py.log")) else 0
            served = sum(v for k, v in m1.items() if k.startswith("tqproxy_requests_total") and 'worker="py"' in k) - \
                sum(v for k, v in m0.items() if k.startswith("tqproxy_requests_total") and 'worker="py"' in k)
            drop_metrics = {k: v for k, v in m1.items() if re.search(r"drop|lost|log_(write_)?error", k)}
            worker_drop = {k: v for k, v in drop_metrics.items() if "access_log" not in k and v > 0}
            # Space again: does logging resume?
            os.unlink(os.path.join(logs, "fill"))
            for _ in range(20):
                baseline_ok = True
                try:
                    from common import http_get
                    http_get(st.port, "/after-space")
                except OSError:
                    baseline_ok = False
            time.sleep(0.5)
            with open(os.path.join(logs, "py.log"), errors="replace") as f:
                resumed = "/after-space" in f.read()
            alive = st.tq_alive()
            st.stop()
        finally:
            st.stop()
            if mounted:
                umount(logs)
        after = st.leaks()
    row.requests, row.failed, row.p50_ms, row.p99_ms = res.requests, res.failed, res.p50_ms, res.p99_ms
    lost = ([lost_text(res)] if res.failed else []) + [f"after stop: {x}" for x in after]
    if not worker_drop:
        lost.append(f"~{served:.0f} worker log lines dropped, counted nowhere")
    row.lost = "; ".join(lost) or "nothing"
    row.ok = not res.failed and bool(worker_drop) and not after and alive
    row.notes = (f"tmpfs {df.f_bavail * df.f_frsize} bytes free after the fill; logs/py.log {size0} → {size1} bytes "
                 f"while the workers served {served:.0f} requests (one log line each); "
                 + (f"drop counters: {worker_drop}" if worker_drop else
                    "MISSED: /metrics has no counter of dropped worker log lines (the only drop counter is "
                    f"{sorted(drop_metrics) or 'none'}, which counts access-log lines; src/supervisor/logs.rs "
                    "Writer::write ignores the write error), issue 11 item 6")
                 + f"; after space was freed, logging {'resumed' if resumed else 'did NOT resume'}"
                 + ("" if baseline_ok else " (a request after the freeing failed)")
                 + f"; load: {res.summary()}")
    return row


def socket_deleted(ctx):
    secs = ctx.secs(10, 3, ci=2)
    row = Row(GROUP, "control socket deleted under tqproxy", f"wrk -t1 -c{CONNS} keep-alive GET /, 2-instance hello",
              "rm run/tqproxy.sock", goal="a clear CLI error, 0 failed, the socket bound again", reproduce=reproduce(ctx, GROUP))
    with Stack("ownsock", {"hello": worker_yaml(BACKEND, instances=2)}, cgroups="off", keep=ctx.keep) as st:
        st.start({"hello": 2})
        base = baseline(st.port, ctx.secs(5, 2, ci=2), connections=CONNS)
        row.base_p50_ms, row.base_p99_ms = base.p50_ms, base.p99_ms
        sock = os.path.join(st.tmp, "run", "tqproxy.sock")
        load = Load(st.port, "/", connections=CONNS).start(settle=1)
        try:
            row.start = st.stats()
            os.unlink(sock)
            r = st.cli("status", timeout=20)
            err = (r.stdout + r.stderr).strip().replace("\n", " | ")
            t_rm = time.monotonic()
            # tqproxy checks the file every second and binds it again.
            back = st.wait(lambda: os.path.exists(sock), timeout=5, step=0.01)
            t_back = time.monotonic() - t_rm
            r2 = st.cli("status", timeout=20)
            time.sleep(secs)
        finally:
            res = load.stop()
        row.end = st.stats()
        alive = st.tq_alive()
        st.stop()
        after = st.leaks()
    row.requests, row.failed, row.p50_ms, row.p99_ms = res.requests, res.failed, res.p50_ms, res.p99_ms
    clear = r.returncode != 0 and sock in err
    lost = ([lost_text(res)] if res.failed else []) + [f"after stop: {x}" for x in after]
    if not clear:
        lost.append(f"no clear CLI error (rc {r.returncode}: {err[:200]})")
    if not (back and r2.returncode == 0):
        lost.append(f"the socket was not bound again (`status` then exit {r2.returncode})")
    row.lost = "; ".join(lost) or "nothing"
    row.ok = not lost and alive
    row.notes = (f"`tqproxy status` without the socket: exit {r.returncode}, \"{err[:300]}\"; "
                 f"the socket {'was bound again after %.2f s' % t_back if back else 'did not come back within 5 s'} "
                 f"(`status` then exit {r2.returncode}); tqproxy kept serving: {res.summary()}")
    return row


def run(ctx):
    rows = guarded(ctx, GROUP, "kill -9 of tqproxy under load, then a restart", lambda: kill9(ctx))
    if ctx.ci:
        return rows
    rows += guarded(ctx, GROUP, "logs directory on a full tmpfs", lambda: full_tmpfs(ctx))
    rows += guarded(ctx, GROUP, "control socket deleted under tqproxy", lambda: socket_deleted(ctx))
    return rows
