"""Group 3 of issue 11, noisy neighbours: worker B (`hello`, 2 instances, /b) serves a steady,
paced wrk load while worker A, under cgroup limits, misbehaves in turn:

  cpu      A (`chaos`) spins 4 threads (/burn) against `cpu: 0.5`
  memory   A leaks (/leak) into `memory: 64M` and is OOM-killed, again and again
  fork     A runs a fork bomb (/fork-bomb) against `pids: 32`
  fds      A leaks fds (/fd-leak) up to `open_files: 256`
  disk     A (`noisy`, a Python worker written into the stack's dir) writes with O_DIRECT as
           fast as it can under `io: { write_bps: 10M }`
  log      A (`noisy`) prints to stdout as fast as it can; tqproxy's pipe + rotation
           (`worker_log_max_size: 4M`, `worker_log_keep: 2`)

B alone is measured first (and again at the end, to show the drift), with the same load and
duration. Per row: B's requests, failed, p50/p99 against B alone (goal: p99 <= 1.2x, 0 failed),
tqproxy's own latency (a request every 10 ms to admin /healthz and one to an unrouted path on the
proxy port, answered 404 by tqproxy itself; goal: p99 <= 1.2x alone), where the CPU went (cores of
tqproxy, B, A, wrk, the machine), and the fault's own figures.

The load: wrk -t1 -c8 with a 1 ms pause per connection between requests (wrk's `delay()` hook),
so that the baseline does not saturate the 2 cores that wrk, tqproxy, B and A share.

Run alone: python3 load-tests/rel/neighbours.py [--quick] [--ci] [--keep]
"""

import json
import os
import sys
import threading
import time
import http.client

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import Row, Load, log  # noqa: E402

GROUP = "neighbours"
TITLE = "Noisy neighbours"

CONNS = 8
PAUSE_MS = 1
DELAY_LUA = f"\nfunction delay() return {PAUSE_MS} end\n"
LIMITS = ("resources: { memory: 64M, cpu: 0.5, pids: 32, open_files: 256, io: { write_bps: 10M } }\n")
LOG_MAX = 4 << 20
LOG_KEEP = 2
WRITE_BPS = 10 << 20
A_EXTRA = ("strip_prefix: true\n" + LIMITS +
           "restart: { backoff: 100ms, backoff_max: 400ms, crashloop_after: 1000, reset_after: 1s }\n"
           "drain_timeout: 2s\nstop_timeout: 2s\n")

# The Python worker for the disk and log floods: started by request, bounded by secs and size.
NOISY = r'''
import mmap, os, sys, threading, time, json
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from urllib.parse import urlparse, parse_qs

STATS = {"disk_bytes": 0, "disk_errors": 0, "disk_mode": None, "log_lines": 0, "log_bytes": 0}

def disk_flood(secs, mb):
    path = os.path.join(os.getcwd(), "flood.bin")
    buf = mmap.mmap(-1, 1 << 20)
    buf.write(b"x" * (1 << 20))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600)
        STATS["disk_mode"] = "O_DIRECT"
    except OSError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        STATS["disk_mode"] = "write+fdatasync"
    end, off = time.monotonic() + secs, 0
    try:
        while time.monotonic() < end:
            try:
                n = os.pwrite(fd, buf, off)
                if STATS["disk_mode"] != "O_DIRECT":
                    os.fdatasync(fd)
            except OSError:
                STATS["disk_errors"] += 1
                time.sleep(0.01)
                continue
            STATS["disk_bytes"] += n
            off = (off + n) % (mb << 20)
    finally:
        os.close(fd)
        os.unlink(path)

def log_flood(secs):
    line = b"noisy: flooding the log " + b"x" * 56 + b"\n"
    block = line * 256
    end = time.monotonic() + secs
    while time.monotonic() < end:
        n = os.write(1, block)
        STATS["log_bytes"] += n
        STATS["log_lines"] += n // len(line)

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        u = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        secs = min(float(q.get("secs", "5")), 600)
        if u.path == "/disk-flood":
            threading.Thread(target=disk_flood, args=(secs, int(q.get("mb", "64"))), daemon=True).start()
        elif u.path == "/log-flood":
            threading.Thread(target=log_flood, args=(secs,), daemon=True).start()
        body = (json.dumps(STATS) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''


class NStack(common.Stack):
    """A Stack whose `log:` map also sets the worker log rotation."""

    def __init__(self, *a, log_extra="", **kw):
        self.log_extra = log_extra
        super().__init__(*a, **kw)

    def write_config(self):
        super().write_config()
        if self.log_extra:
            with open(self.cfg) as f:
                text = f.read()
            with open(self.cfg, "w") as f:
                f.write(text.replace("log: { level: info }", f"log: {{ level: info, {self.log_extra} }}"))


# ---------------------------------------------------------------------------------------------
# figures

CLK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        fields = st[st.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / CLK
    except (OSError, ValueError, IndexError):
        return 0.0


def thread_cpu(pid):
    """{thread name: CPU seconds} of a process (threads of the same name summed)."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        out[name] = out.get(name, 0.0) + proc_cpu(f"{pid}/task/{t}")
    return out


def machine_busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def cg_path(inst, controller, name):
    return (inst.get("cgroup") or "").replace("/memory/", f"/{controller}/", 1) + "/" + name


def cg_read(inst, controller, name):
    try:
        with open(cg_path(inst, controller, name)) as f:
            return f.read().strip()
    except OSError:
        return None


def worker_cpu(st, name):
    """Seconds of CPU of every instance cgroup of a worker (from cpuacct.usage)."""
    total = 0.0
    for i in (st.worker(name) or {}).get("instances", []):
        v = cg_read(i, "cpuacct", "cpuacct.usage")
        total += int(v) / 1e9 if v else 0.0
    return total


class CpuWindow:
    """Cores used by tqproxy, B, A, wrk and the whole machine between start() and stop()."""

    def __init__(self, st, a_name, wrk_pid):
        self.st, self.a, self.wrk = st, a_name, wrk_pid

    def snap(self):
        return (time.monotonic(), proc_cpu(self.st.tq.pid), worker_cpu(self.st, "b"),
                worker_cpu(self.st, self.a), proc_cpu(self.wrk), machine_busy(), thread_cpu(self.st.tq.pid))

    def start(self):
        self.s0 = self.snap()
        return self

    def stop(self):
        s1 = self.snap()
        dt = s1[0] - self.s0[0]
        busy = (s1[5][0] - self.s0[5][0]) / max(1, s1[5][1] - self.s0[5][1]) * os.cpu_count()
        a = s1[3] - self.s0[3]
        self.cores = {"tqproxy": (s1[1] - self.s0[1]) / dt, "B": (s1[2] - self.s0[2]) / dt,
                      "A": a / dt if a >= 0 else float("nan"), "wrk": (s1[4] - self.s0[4]) / dt,
                      "machine": busy}
        th = {k: (v - self.s0[6].get(k, 0.0)) / dt for k, v in s1[6].items()}
        self.threads = sorted(th.items(), key=lambda kv: -kv[1])[:2]
        return self

    def text(self):
        return ("cores: " + ", ".join(f"{k} {v:.2f}" for k, v in self.cores.items())
                + " (tqproxy's busiest threads: " + ", ".join(f"{k} {v:.2f}" for k, v in self.threads) + ")")


class OwnProbe(common.Background):
    """tqproxy's own latency: every interval, GET /healthz on the admin port and GET of an
    unrouted path on the proxy port (tqproxy's own 404), each on a keep-alive connection."""

    JOIN_TIMEOUT = 10

    def __init__(self, st, interval=0.01):
        self.st, self.interval = st, interval
        self.lat = {"healthz": [], "proxy404": []}
        self.codes = {"healthz": {}, "proxy404": {}}
        self.errors = 0
        super().__init__()

    def _one(self, conns, key, port, path):
        c = conns.get(key)
        if c is None:
            c = conns[key] = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        t0 = time.perf_counter()
        try:
            c.request("GET", path)
            r = c.getresponse()
            r.read()
            self.lat[key].append((time.perf_counter() - t0) * 1000)
            self.codes[key][r.status] = self.codes[key].get(r.status, 0) + 1
        except (OSError, http.client.HTTPException):
            self.errors += 1
            c.close()
            conns.pop(key, None)

    def _run(self):
        conns = {}
        deadline = time.monotonic() + 900
        while not self._stop.is_set() and time.monotonic() < deadline:
            self._one(conns, "healthz", self.st.admin, "/healthz")
            self._one(conns, "proxy404", self.st.port, "/not-routed")
            self._stop.wait(self.interval)
        for c in conns.values():
            c.close()


    def p(self, key, q):
        v = sorted(self.lat[key])
        if not v:
            return float("nan")
        return v[min(len(v) - 1, int(q * len(v)))]

    def p99(self):
        """The worse of the two p99s (ms)."""
        return max(self.p("healthz", 0.99), self.p("proxy404", 0.99))

    def text(self):
        return (f"own: healthz p50/p99 {self.p('healthz', 0.5):.2f}/{self.p('healthz', 0.99):.2f} ms "
                f"({len(self.lat['healthz'])} req, codes {self.codes['healthz']}), proxy 404 "
                f"{self.p('proxy404', 0.5):.2f}/{self.p('proxy404', 0.99):.2f} ms "
                f"({len(self.lat['proxy404'])} req, codes {self.codes['proxy404']})"
                + (f", {self.errors} errors" if self.errors else ""))


def a_get(st, path, timeout=5):
    try:
        s, body = common.http_get(st.port, path, timeout=timeout)
        return s, body.decode(errors="replace")
    except (OSError, http.client.HTTPException) as e:
        return None, str(e)


def a_json(st, path, timeout=5):
    s, body = a_get(st, path, timeout)
    try:
        return json.loads(body) if s == 200 else {}
    except ValueError:
        return {}


def only_instance(st, name):
    inst = (st.worker(name) or {}).get("instances", [])
    ready = [i for i in inst if i.get("state") == "ready"]
    return (ready or inst or [{}])[0]


# ---------------------------------------------------------------------------------------------
# the faults: each (name, A's worker, description, start(st, secs) -> state, during(st, state,
# stop_event), end(st, state) -> notes)

def cpu_start(st, secs):
    s, body = a_get(st, f"/a/burn?threads=4&secs={max(1, int(secs))}")
    return {"answer": (s, body.strip()), "inst": only_instance(st, "a"),
            "thr0": cg_read(only_instance(st, "a"), "cpu", "cpu.stat")}


def cpu_end(st, state, cpu):
    stat = dict(l.split() for l in (cg_read(state["inst"], "cpu", "cpu.stat") or "").splitlines())
    stat0 = dict(l.split() for l in (state["thr0"] or "").splitlines())
    per = int(stat.get("nr_periods", 0)) - int(stat0.get("nr_periods", 0))
    thr = int(stat.get("nr_throttled", 0)) - int(stat0.get("nr_throttled", 0))
    ok = state["answer"][0] == 200
    # Held: never above the quota (+10 %). Not throttled at all means A never reached it (the
    # machine was busy): said in the note, not a failure of the limit.
    return (f"A's cgroup used {cpu.cores['A']:.3f} cores (quota 0.5), throttled in {thr} of {per} periods"
            + ("" if thr else " (A never reached its quota: the machine was busy)")
            + ("" if ok else f"; /burn answered {state['answer']}")), ok and cpu.cores["A"] <= 0.55


def mem_start(st, secs):
    return {"leaks": 0, "before": st.metrics().get(
        'tqproxy_worker_restarts_total{cause="memory",worker="a"}', 0)}


def mem_during(st, state, stop):
    # Leak whenever A is ready: 1 MiB every 2 ms into a 64M limit (killed after ~0.15 s).
    while not stop.is_set():
        if st.ready_instances("a"):
            s, _ = a_get(st, "/a/leak?mb=256&rate_ms=2", timeout=2)
            if s == 200:
                state["leaks"] += 1
            stop.wait(1.0)
        else:
            stop.wait(0.05)


def mem_end(st, state, cpu):
    st.wait(lambda: bool(st.ready_instances("a")), 5)
    after = st.metrics().get('tqproxy_worker_restarts_total{cause="memory",worker="a"}', 0)
    kills = int(after - state["before"])
    last = only_instance(st, "a").get("last_exit")
    return (f"{state['leaks']} leaks started, {kills} restarts with cause memory "
            f"(last exit: {last})"), kills >= 1 and kills <= state["leaks"] and "out of memory" in str(last)


def fork_start(st, secs):
    s, body = a_get(st, "/a/fork-bomb?max=5000", timeout=5)
    return {"answer": (s, body.strip()), "inst": only_instance(st, "a")}


def fork_end(st, state, cpu):
    stats = a_json(st, "/a/fork-stats")
    cur = cg_read(state["inst"], "pids", "pids.current")
    ev = cg_read(state["inst"], "pids", "pids.events")
    note = (f"forked {stats.get('forked')}, refused {stats.get('failed')} "
            f"({stats.get('last_error')}), pids.current {cur} of 32, pids.events `{ev}`")
    held = bool(stats) and stats.get("failed", 0) > 0 and cur is not None and int(cur) <= 32
    restart(st)
    return note, held


def fd_start(st, secs):
    return {"leak": a_json(st, "/a/fd-leak"), "inst": only_instance(st, "a"), "probes": 0, "refused": 0,
            "unanswered": 0}


def fd_during(st, state, stop):
    while not stop.is_set():
        s, body = a_get(st, "/a/open-file", timeout=2)
        state["probes"] += 1
        if s == 200 and '"ok":false' in body.replace(" ", ""):
            state["refused"] += 1
        elif s != 200:
            state["unanswered"] += 1
        stop.wait(0.5)


def fd_end(st, state, cpu):
    leak = state["leak"]
    w = st.worker("a") or {}
    note = (f"/fd-leak opened {leak.get('opened')} ({leak.get('error')}); then {state['probes']} "
            f"/open-file probes: {state['refused']} refused inside A, {state['unanswered']} not answered "
            f"(non-200); A restarts {w.get('restarts')}; A used {cpu.cores['A']:.2f} cores")
    held = bool(leak) and leak.get("error") is not None and (leak.get("total") or 0) <= 256
    restart(st)
    return note, held


def disk_start(st, secs):
    inst = only_instance(st, "n")
    return {"answer": a_json(st, f"/n/disk-flood?secs={secs:.1f}&mb=64"), "inst": inst, "t0": time.monotonic(),
            "io0": blkio_write(inst)}


def blkio_write(inst):
    text = cg_read(inst, "blkio", "blkio.throttle.io_service_bytes") or ""
    return sum(int(l.split()[2]) for l in text.splitlines() if len(l.split()) == 3 and l.split()[1] == "Write")


def disk_end(st, state, cpu):
    dt = time.monotonic() - state["t0"]
    stats = a_json(st, "/n/")
    io = blkio_write(state["inst"]) - state["io0"]
    rate = stats.get("disk_bytes", 0) / dt
    note = (f"A wrote {stats.get('disk_bytes', 0) / 1e6:.1f} MB in {dt:.1f} s ({stats.get('disk_mode')}): "
            f"{rate / (1 << 20):.2f} MiB/s against write_bps 10M (10 MiB/s); blkio counted "
            f"{io / (1 << 20):.1f} MiB; {stats.get('disk_errors', 0)} write errors")
    # Held: not above the limit (10 % for the first second's burst), and the flood did write.
    return note, 0 < rate <= WRITE_BPS * 1.1


def log_start(st, secs):
    return {"answer": a_json(st, f"/n/log-flood?secs={secs:.1f}"), "t0": time.monotonic()}


def log_end(st, state, cpu):
    dt = time.monotonic() - state["t0"]
    time.sleep(0.5)
    stats = a_json(st, "/n/")
    logs = os.path.join(st.tmp, "logs")
    files = sorted(f for f in os.listdir(logs) if f.startswith("n.log"))
    sizes = {f: os.path.getsize(os.path.join(logs, f)) for f in files}
    lines = stats.get("log_lines", 0)
    note = (f"A printed {lines} lines ({lines / dt / 1000:.0f}k lines/s, "
            f"{stats.get('log_bytes', 0) / dt / (1 << 20):.1f} MiB/s) to its pipe; log files "
            + ", ".join(f"{f} {s / (1 << 20):.2f} MiB" for f, s in sizes.items())
            + f" (max {LOG_MAX >> 20} MiB, keep {LOG_KEEP}); tqproxy RSS max {state.get('rss_max', 0) / 1024:.1f} MiB")
    held = (lines > 0 and len(files) <= LOG_KEEP + 1 and all(s <= LOG_MAX for s in sizes.values()))
    if cpu.cores["tqproxy"] > 3 * max(cpu.cores["A"], 0.01):
        note += (f"; FINDING: copying A's output costs tqproxy {cpu.cores['tqproxy']:.2f} cores against A's own "
                 f"{cpu.cores['A']:.2f} (outside A's cpu quota; the pump runs on the supervisor's thread, "
                 f"which also answers /healthz and runs the health checks)")
    return note, held


def restart(st):
    """Replaces A's instance (clears a fork bomb's children and leaked fds)."""
    r = st.cli("restart", "a", timeout=30)
    if r.returncode:
        log(f"  tqproxy restart a: {r.returncode} {r.stdout}{r.stderr}")
    st.wait(lambda: bool(st.ready_instances("a")), 10)


FAULTS = [
    ("cpu", "a", "A (chaos) burns 4 threads at `cpu: 0.5`", cpu_start, None, cpu_end),
    ("memory", "a", "A (chaos) leaks 1 MiB / 2 ms into `memory: 64M`, again each time it is back", mem_start,
     mem_during, mem_end),
    ("fork", "a", "A (chaos) fork bomb against `pids: 32`", fork_start, None, fork_end),
    ("fds", "a", "A (chaos) opens fds until `open_files: 256` refuses", fd_start, fd_during, fd_end),
    ("disk", "n", "A (noisy.py) O_DIRECT 1 MiB writes as fast as it can under `io: { write_bps: 10M }`",
     disk_start, None, disk_end),
    ("log", "n", f"A (noisy.py) prints 80-byte lines as fast as it can (worker_log_max_size "
     f"{LOG_MAX >> 20}M, keep {LOG_KEEP})", log_start, None, log_end),
]


# ---------------------------------------------------------------------------------------------

def measure(st, secs, a_name="a", fault=None):
    """One phase: B's load + tqproxy's own latency for secs, with the fault (or none)."""
    load = Load(st.port, "/b/", connections=CONNS, extra_lua=DELAY_LUA, tmp=st.tmp, duration=int(secs) + 30)
    start = st.stats()
    sampler = common.Sampler(st.tq.pid, 0.25).start()
    load.start(settle=0.0)
    probe = OwnProbe(st).start()
    cpu = CpuWindow(st, a_name, load.p.pid).start()
    state, stop, th = None, threading.Event(), None
    try:
        time.sleep(0.5)
        if fault:
            state = fault[3](st, secs)
            if fault[4]:
                th = threading.Thread(target=fault[4], args=(st, state, stop), daemon=True)
                th.start()
        time.sleep(max(0.0, secs - 0.5))
    finally:
        stop.set()
        cpu.stop()
        res = load.stop()
        probe.stop()
        sampler.stop()
        if th:
            th.join(timeout=10)
    if state is not None:
        state["rss_max"] = sampler.max("rss_kb") or 0
    return res, probe, cpu, state, start, st.stats(), sampler


def run(ctx):
    ci = getattr(ctx, "ci", False)
    secs = 3 if ci else (15 if not ctx.quick else 3)
    faults = FAULTS[:1] if ci else FAULTS
    common.ensure_tools("wrk")
    load_desc = (f"wrk -t1 -c{CONNS} keep-alive GET /b/ (hello x2), {PAUSE_MS} ms pause per connection "
                 f"between requests, {secs} s per phase")
    workers = {
        # NEIGHBOURS_B_EXTRA: more worker.yaml lines for B (e.g. to compare scheduling policies).
        "b": common.worker_yaml(common.BACKEND, instances=2, routes=["/b"],
                                extra="strip_prefix: true\n" + os.environ.get("NEIGHBOURS_B_EXTRA", "")),
        "a": common.worker_yaml(common.CHAOS, instances=1, routes=["/a"], extra=A_EXTRA),
        "n": common.worker_yaml(["python3", "noisy.py"], instances=1, routes=["/n"], health=None,
                                extra=A_EXTRA),
    }
    rows, bases = [], []
    reproduce = "load-tests/reliability --only neighbours" + (" --quick" if ctx.quick else "")
    with NStack("neighbours", workers, cgroups=ctx.cgroups, keep=ctx.keep,
                log_extra=f"worker_log_max_size: {LOG_MAX >> 20}M, worker_log_keep: {LOG_KEEP}") as st:
        with open(os.path.join(st.tmp, "workers", "n", "noisy.py"), "w") as f:
            f.write(NOISY)
        st.start(ready={"a": 1, "b": 2, "n": 1})
        cg_mode = (st.status() or {}).get("cgroups")
        if cg_mode in (None, "off"):
            log("  cgroups are off: the limits cannot hold; neighbours needs cgroups")
        t_start = time.monotonic()
        s0 = st.stats()
        for fault in faults:
            name, a_name, desc, *_ = fault
            t0 = time.monotonic()
            # B alone right before each fault: the machine's drift between phases is then not
            # counted against the fault.
            base, bprobe, bcpu, _, _, _, _ = measure(st, secs, a_name)
            bases.append((base, bprobe, bcpu))
            log(f"  B alone: {base.summary()}; {bprobe.text()}; {bcpu.text()}")
            res, probe, cpu, state, start, end, sampler = measure(st, secs, a_name, fault)
            note, held = fault[5](st, state, cpu)
            own_ratio = probe.p99() / bprobe.p99()
            misses = []
            if res.failed:
                misses.append(f"B failed {res.failed}")
            if res.p99_ms > 1.2 * base.p99_ms:
                misses.append(f"B p99 x{res.p99_ms / base.p99_ms:.2f} > 1.2")
            if not own_ratio <= 1.2:
                misses.append(f"tqproxy's own p99 x{own_ratio:.2f} > 1.2")
            hard = bool(res.failed) or not held
            if not held:
                misses.append("the limit did not hold as expected")
            row = Row(GROUP, f"A: {name}", load_desc, desc, requests=res.requests, failed=res.failed,
                      p50_ms=res.p50_ms, p99_ms=res.p99_ms, base_p50_ms=base.p50_ms, base_p99_ms=base.p99_ms,
                      start=start, end=end,
                      lost="nothing" if res.failed == 0 else f"{res.failed} of B's requests "
                      f"(non-2xx {res.non2xx} [{res.bad_codes.strip()}], socket errors {res.socket_errors})",
                      goal="B: p99 <= 1.2x alone, 0 failed; tqproxy's own p99 <= 1.2x; A held by its limit",
                      ok=not misses, reproduce=reproduce,
                      notes=(f"{note}; B {res.rps:.0f} req/s (alone {base.rps:.0f}); {probe.text()} "
                             f"(alone: p99 {bprobe.p99():.2f} ms, x{own_ratio:.2f}); {cpu.text()} "
                             f"(alone: {bcpu.text()}); tqproxy RSS max {(sampler.max('rss_kb') or 0) / 1024:.1f} MiB"
                             + (f"; MISSED: {', '.join(misses)}" if misses else "")),
                      duration_s=time.monotonic() - t0,
                      # p99 ratios on a shared machine are figures, not CI failures
                      ci_fatal=hard)
            rows.append(ctx.emit(row))
        base, bprobe, bcpu = bases[0]
        p99s = [b[0].p99_ms for b in bases]
        own99 = [b[1].p99() for b in bases]
        failed = sum(b[0].failed for b in bases)
        base_row = Row(GROUP, "B alone (baseline)", load_desc, "none", requests=sum(b[0].requests for b in bases),
                       failed=failed, p50_ms=base.p50_ms, p99_ms=base.p99_ms, base_p50_ms=base.p50_ms,
                       base_p99_ms=base.p99_ms, start=s0, end=st.stats(),
                       lost="nothing" if failed == 0 else f"{failed} requests",
                       goal="0 failed", ok=failed == 0, reproduce=reproduce,
                       notes=(f"cgroups {cg_mode}; the first of {len(bases)} B-alone phases (one before each "
                              f"fault; each row compares with its own): {base.rps:.0f} req/s, {bprobe.text()}, "
                              f"{bcpu.text()}; B p99 over all of them {min(p99s):.2f}-{max(p99s):.2f} ms, "
                              f"tqproxy's own p99 {min(own99):.2f}-{max(own99):.2f} ms (the drift of the "
                              f"baseline itself); load average {common.loadavg()}"),
                       duration_s=time.monotonic() - t_start)
        running = st.running_leaks() if hasattr(st, "running_leaks") else []
        st.stop()
        leaks = st.leaks()
        if running or leaks:
            base_row.ok = False
            base_row.lost = f"left behind: {'; '.join(running + leaks)}"
            log(f"  left behind: while running {running}, after stop {leaks}")
        else:
            base_row.notes += "; nothing left behind (running_leaks after the faults, leaks after stop)"
        rows.insert(0, ctx.emit(base_row))
    return rows


if __name__ == "__main__":
    ctx = common.Ctx(quick="--quick" in sys.argv, keep="--keep" in sys.argv, ci="--ci" in sys.argv,
                     on_row=lambda r: print(r.line(), flush=True))
    t = time.monotonic()
    rows = run(ctx)
    print(f"{GROUP}: {len(rows)} rows, {sum(not r.ok for r in rows)} missed, {time.monotonic() - t:.1f} s")
