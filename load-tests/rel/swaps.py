"""Group 2 of `load-tests/reliability`: swap storms (issue 11, item 2).

Back to back under steady keep-alive wrk load (GET /, -c16) on a 4-instance `hello` worker, each
storm in a stack of its own: 100 reloads of a changed worker (--quick 5), 100 blue/green deploys
each followed by a rollback (--quick 3), 20 `tqproxy upgrade`s in a row (--quick 2). Each must fail
0 requests and leak nothing. Per storm: requests, failed, p50/p99 against a baseline run of the
same load without swaps, the commands' durations, tqproxy's RSS/fds/threads start → end.

`tqproxy upgrade` replaces the process: the CLI prints `upgraded: pid OLD → NEW`; the new process
is started by the old one (so it is not our child) and is followed by its pid (Stack.follow_pid;
checked against /status.json's pid) for the figures, the leak checks and the final stop.
"""

import re
import time

from common import (BACKEND, Load, Row, Stack, baseline, cli_summary, fmt_delta, fmt_stats, guarded,
                    http_get, inject_leak, log, metric_delta, pid_alive, reproduce, worker_yaml)

GROUP = "swaps"
TITLE = "Swap storms under load"
CONNS = 16


def worker_text(version, bluegreen=False):
    deploy = ("deploy: { strategy: bluegreen, rollback_window: 10m }\n" if bluegreen
              else "deploy: { strategy: rolling, max_surge: 1 }\n")
    return worker_yaml(BACKEND, instances=4, env={"HELLO_VERSION": f"v{version}"},
                       extra=deploy + "drain_timeout: 10s\nstop_timeout: 5s\n")


def storm(ctx, name, n, bluegreen, step):
    """One storm: baseline, then n swaps (step(st, i, calls) does one) under load; a Row."""
    base_secs = ctx.secs(10, 3, ci=2)
    row = Row(GROUP, name, f"wrk -t1 -c{CONNS} keep-alive GET /, 4-instance hello", "-",
              goal="0 failed, nothing leaked", reproduce=reproduce(ctx, GROUP))
    calls = []
    with Stack("swaps", {"hello": worker_text(0, bluegreen)}, cgroups=ctx.cgroups, keep=ctx.keep) as st:
        st.start({"hello": 4})
        base = baseline(st.port, base_secs, connections=CONNS)
        row.base_p50_ms, row.base_p99_ms = base.p50_ms, base.p99_ms
        log(f"  baseline ({base_secs} s): {base.summary()}")
        first_pid = st.tq_pid()
        load = Load(st.port, "/", connections=CONNS).start(settle=2)
        t_storm = time.monotonic()
        try:
            cold = st.stats()
            if step is not upgrade_step:
                # Warm-up: one restart (the first swap starts tokio's blocking threads once).
                run_cli(st, [], "restart", "hello")
                time.sleep(1)
            row.start = st.stats()
            m0 = st.metrics()
            deadline = time.monotonic() + ctx.secs(1800, 300, ci=120)
            for i in range(1, n + 1):
                if time.monotonic() > deadline:
                    log(f"  {name}: time bound reached after {i - 1} swaps")
                    break
                step(st, i, calls)
                time.sleep(0.2)
            t_storm = time.monotonic() - t_storm
            time.sleep(1)
            m1 = st.metrics()
        finally:
            res = load.stop()
        # Settle without load, past tokio's 10 s keep-alive of idle blocking-pool threads (each
        # holds its stack and allocator pages while it lives).
        time.sleep(ctx.secs(12, 12, ci=3))
        row.end = st.stats()
        running = st.running_leaks()
        final_pid = st.tq_pid()
        if ctx.inject_leak:
            inject_leak(st)
        st.stop()
        after = st.leaks()
        if final_pid != first_pid and pid_alive(first_pid):
            after.append(f"the first tqproxy (pid {first_pid}) still runs")
    row.requests, row.failed = res.requests, res.failed
    row.p50_ms, row.p99_ms = res.p50_ms, res.p99_ms
    bad = [c for c in calls if c[1] != 0]
    done = sum(1 for c in calls if c[0] in ("reload", "deploy", "upgrade"))
    row.faults = f"{done} x {name.split(' (')[0]}" + (f"; {len(bad)} commands failed" if bad else "")
    lost = []
    if res.failed:
        lost.append(f"{res.failed} requests (non-2xx {res.non2xx} [{res.bad_codes.strip()}], socket errors "
                    f"c/r/w/t {'/'.join(map(str, res.socket_errors))})")
    lost += running + [f"after stop: {x}" for x in after]
    if bad:
        lost.append(f"{len(bad)} swaps failed")
    row.lost = "; ".join(lost) or "nothing"
    row.ok = not lost and done == n
    d = metric_delta(m0, m1, "tqproxy_retries_total", "tqproxy_upstream_errors_total", "tqproxy_requests_total",
                     "tqproxy_unrouted") if m1 and m0 and final_pid == first_pid else {}
    notes = [f"{done}/{n} swaps in {t_storm:.0f} s; commands: {cli_summary(calls)}",
             f"tqproxy pid {first_pid} → {final_pid} (counters restart with each process: no metrics delta)"
             if final_pid != first_pid else "",
             f"start after a warm-up under load" + (" and one restart" if step is not upgrade_step else "")
             + f" (before: {fmt_stats(cold)}); end is {ctx.secs(12, 12, ci=3)} s after the load stopped: {fmt_stats(row.end)}",
             f"metrics during the storm: {fmt_delta(d)}" if d else "",
             f"wrk: {res.summary()}"]
    if bad:
        notes.append("failures: " + " | ".join(f"{v} rc {rc}: {m[:200]}" for v, rc, _, m in bad[:4]))
    row.notes = ". ".join(x for x in notes if x)
    return row


def run_cli(st, calls, verb, *args, timeout=120):
    t0 = time.monotonic()
    try:
        r = st.cli(verb, *args, timeout=timeout)
        rc, msg = r.returncode, (r.stdout + r.stderr).strip().replace("\n", " | ")
    except Exception as e:  # noqa: BLE001 - a timeout is a failed swap
        rc, msg = -1, f"{type(e).__name__}: {e}"
    calls.append((verb, rc, time.monotonic() - t0, msg))
    return rc, msg


def served_version(st):
    try:
        s, body = http_get(st.port, "/version")
        return body.decode().strip() if s == 200 else f"HTTP {s}"
    except OSError as e:
        return f"error {e}"


def reload_step(st, i, calls):
    st.write_worker("hello", worker_text(i))
    rc, msg = run_cli(st, calls, "reload")
    if rc == 0 and served_version(st) != f"v{i}":
        calls.append(("version-check", 1, 0.0, f"after reload {i}: served {served_version(st)}, want v{i}"))


def bluegreen_step(st, i, calls):
    before = served_version(st)
    st.write_worker("hello", worker_text(i, bluegreen=True))
    rc, _ = run_cli(st, calls, "deploy", "hello")
    if rc == 0 and served_version(st) != f"v{i}":
        calls.append(("version-check", 1, 0.0, f"after deploy {i}: served {served_version(st)}, want v{i}"))
    rc, _ = run_cli(st, calls, "rollback", "hello")
    if rc == 0 and served_version(st) != before:
        calls.append(("version-check", 1, 0.0, f"after rollback {i}: served {served_version(st)}, want {before}"))


def upgrade_step(st, i, calls):
    old = st.tq_pid()
    rc, msg = run_cli(st, calls, "upgrade", timeout=200)
    m = re.search(r"upgraded: pid (\d+) → (\d+)", msg)
    if rc == 0 and m:
        new = int(m.group(2))
        st.follow_pid(new)
        s = st.status()
        if not s or s.get("pid") != new:
            calls.append(("pid-check", 1, 0.0, f"upgrade {i}: status pid {s and s.get('pid')}, CLI said {new}"))
        if pid_alive(old):
            calls.append(("pid-check", 1, 0.0, f"upgrade {i}: old pid {old} still alive after the CLI returned"))
    elif rc == 0:
        calls.append(("pid-check", 1, 0.0, f"upgrade {i}: no 'upgraded: pid A → B' in {msg[:200]!r}"))
    if rc == 0 and not st.wait_ready("hello", 4, timeout=10):
        calls.append(("ready-check", 1, 0.0, f"upgrade {i}: not 4 ready instances after the upgrade"))


def run(ctx):
    q = ctx.quick or ctx.ci
    storms = [
        (f"{5 if q else 100} reloads (rolling, changed env)", 5 if q else 100, False, reload_step),
        (f"{3 if q else 100} blue/green deploys + rollbacks", 3 if q else 100, True, bluegreen_step),
        (f"{2 if q else 20} tqproxy upgrades", 2 if q else 20, False, upgrade_step),
    ]
    if ctx.ci:
        storms = storms[:1]
    rows = []
    for name, n, bg, step in storms:
        rows += guarded(ctx, GROUP, name, lambda: storm(ctx, name, n, bg, step))
    return rows
