"""Shared pieces of `load-tests/reliability` (issue 11): a tqproxy stack in a temp dir, a wrk load
that counts every failure, process figures, leak checks, and the result row.

Every scenario module (`load-tests/rel/<group>.py`) exposes

    GROUP = "chaos"                      # short name, used by `reliability --only GROUP`
    TITLE = "Chaos soak"                 # the section title in RELIABILITY.md
    def run(ctx: Ctx) -> list[Row]       # runs the group's scenarios, bounded in time

and uses only loopback (or network namespaces it creates), kills by pid, and removes what it
created (the Stack does that for tqproxy, its instances, cgroups and the temp dir).
"""

import dataclasses
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(REPO, "target", "release")
TQPROXY = os.path.join(BIN, "tqproxy")
BACKEND = os.path.join(BIN, "backend")  # the worker every stack runs as `hello` (workers/backend)
CHAOS = os.path.join(BIN, "chaos")
RAWECHO = os.path.join(BIN, "rawecho")
PROBE = os.path.join(BIN, "probe")


def log(msg=""):
    print(msg, flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


@dataclasses.dataclass
class Ctx:
    """What a group is given: --quick shortens every duration (a few seconds each)."""
    quick: bool
    keep: bool = False          # keep temp dirs (configs, logs) for a look afterwards
    cgroups: str = "auto"       # tqproxy's cgroups.mode for stacks that want limits
    ci: bool = False            # --ci: each group runs only its first/cheapest scenario (implies quick)
    inject_leak: bool = False   # --inject-leak: a scenario leaves a process behind on purpose (self-test
                                # of the leak checks: its rows must then fail)
    on_row: object = None       # called with each Row as it completes (the runner prints it)

    def secs(self, full, quick, ci=None):
        """A duration: full, or quick with --quick, or ci (default quick) with --ci."""
        if self.ci and ci is not None:
            return ci
        return quick if self.quick or self.ci else full

    def emit(self, row):
        """Reports a finished row at once (printed by the runner); returns it."""
        if self.on_row:
            self.on_row(row)
        return row


# ---------------------------------------------------------------------------------------------
# ports

_USED = set()
STACKS = []     # every Stack and Load made in this process, for the runner's last-resort cleanup
LOADS = []


def port_free(p):
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port():
    for _ in range(10000):
        p = random.randint(20000, 32000)
        if p not in _USED and port_free(p):
            _USED.add(p)
            return p
    raise RuntimeError("no free port in 20000-32000")


def port_block(n):
    for _ in range(10000):
        lo = random.randint(10000, 19999 - n)  # below ip_local_port_range (32768-60999)
        if all(p not in _USED and port_free(p) for p in range(lo, lo + n)):
            _USED.update(range(lo, lo + n))
            return lo, lo + n - 1
    raise RuntimeError(f"no block of {n} free ports")


def listening_ports(lo, hi):
    """TCP ports in [lo, hi] that something listens on (from /proc/net/tcp{,6})."""
    out = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A":  # LISTEN
                        port = int(parts[1].rsplit(":", 1)[1], 16)
                        if lo <= port <= hi:
                            out.add(port)
        except OSError:
            pass
    return out


def port_holders(ports):
    """{port: [pids]} of the processes holding a listening TCP socket on each of ports (127.0.0.1
    or any address), found by socket inode in /proc/*/fd."""
    inodes = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A":
                        port = int(parts[1].rsplit(":", 1)[1], 16)
                        if port in ports:
                            inodes[f"socket:[{parts[9]}]"] = port
        except OSError:
            pass
    out = {}
    if not inodes:
        return out
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{d}/fd"):
                try:
                    t = os.readlink(f"/proc/{d}/fd/{fd}")
                except OSError:
                    continue
                if t in inodes:
                    out.setdefault(inodes[t], []).append(int(d))
        except OSError:
            pass
    return out


def http_get(port, path, timeout=5, host=None, method="GET"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, headers={"Host": host} if host else {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------
# processes

def proc_stats(pid):
    """{"rss_kb", "fds", "threads"} of a live process (None values if it is gone)."""
    out = {"rss_kb": None, "fds": None, "threads": None}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    out["rss_kb"] = int(line.split()[1])
                elif line.startswith("Threads:"):
                    out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        pass
    return out


def fmt_stats(s):
    if not s or s.get("rss_kb") is None:
        return "-"
    return f"{s['rss_kb'] / 1024:.1f} MiB / {s['fds']} fds / {s['threads']} thr"


def pid_alive(pid):
    """pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        return st[st.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def fd_targets(pid):
    """{fd: readlink target} of a live process ({} if it is gone)."""
    out = {}
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                pass
    except OSError:
        pass
    return out


def fd_kinds(pid):
    """Counts of a process's fds by kind: socket, pipe, pidfd, eventpoll, file, ..."""
    out = {}
    for t in fd_targets(pid).values():
        if t.startswith("socket:"):
            k = "socket"
        elif t.startswith("pipe:"):
            k = "pipe"
        elif t.startswith("anon_inode:"):
            k = t[len("anon_inode:"):].strip("[]")
        else:
            k = "file"
        out[k] = out.get(k, 0) + 1
    return out


def _ppid(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            st = f.read()
        return int(st[st.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid):
    """Pids of every live descendant of pid (walks /proc, so a re-parented one is not found)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
            ppid = int(st[st.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def pids_with_cmdline_containing(needle):
    """Live pids whose command line contains needle (a temp dir path: unique to one stack)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{d}/environ", "rb") as f:
                env = f.read().decode(errors="replace")
        except OSError:
            continue
        if needle in cmd or needle in env:
            out.append(int(d))
    return out


def cgroup_dirs(base):
    """Directories named base under the machine's cgroup hierarchies (v1 controllers, v2)."""
    out = []
    root = "/sys/fs/cgroup"
    try:
        entries = os.listdir(root)
    except OSError:
        return out
    candidates = [os.path.join(root, base)] + [os.path.join(root, e, base) for e in entries]
    for c in candidates:
        if os.path.isdir(c):
            out.append(c)
    return out


def cgroup_leftovers(base):
    """Sub-cgroups still under base (each an instance cgroup that was not removed)."""
    out = []
    for d in cgroup_dirs(base):
        for dirpath, dirnames, _ in os.walk(d):
            for n in dirnames:
                out.append(os.path.join(dirpath, n))
    return out


# ---------------------------------------------------------------------------------------------
# a tqproxy stack

class Stack:
    """tqproxy from a temp dir: one tqproxy.yaml and workers/<name>/worker.yaml each.

    workers: {name: worker.yaml text}. proxy: extra YAML for the `proxy:` map (e.g.
    "client_header_timeout: 2s"). top: extra top-level YAML lines. cgroups: "off" or a mode; the
    cgroup base is unique per stack (tqrel-<random>) so leftovers are attributable.

        with Stack("chaos", {"hello": worker_yaml(BACKEND, instances=4)}) as st:
            st.wait_ready("hello", 4)
            ...
            leaks = st.stop_and_check()   # after stop: processes, ports, cgroups left behind
    """

    def __init__(self, name, workers, proxy="", top="", cgroups="off", ports=200, keep=False):
        self.name = name
        self.tmp = tempfile.mkdtemp(prefix=f"tqrel-{name}-")
        self.keep = keep
        self.tq = None
        self.tq_pid_override = None
        self.procs = []
        self.cgroups = "off"
        self.cg_base = "tqrel-none"
        self.lo = self.hi = self.port = self.admin = 0
        STACKS.append(self)     # registered at once: an exception below still leaves a dir to remove
        self.port = free_port()
        self.admin = free_port()
        self.lo, self.hi = port_block(ports)
        self.cg_base = f"tqrel-{random.randint(0, 1 << 30):x}"
        self.cgroups = cgroups
        self.cfg = os.path.join(self.tmp, "tqproxy.yaml")
        self.procs = []
        self.tq = None
        self.tq_pid_override = None     # set by follow_pid() after `tqproxy upgrade`
        self.proxy_extra = proxy
        self.top = top
        for w, text in workers.items():
            self.write_worker(w, text)
        self.write_config()

    # -- files

    def write_config(self):
        cg = f'{{ mode: "{self.cgroups}", base: {self.cg_base} }}' if self.cgroups != "off" else '{ mode: "off" }'
        proxy = "threads: 1" + (f", {self.proxy_extra}" if self.proxy_extra else "")
        with open(self.cfg, "w") as f:
            f.write(f"""# generated by load-tests/reliability ({self.name})
listen: ["127.0.0.1:{self.port}"]
control: {{ socket: run/tqproxy.sock, admin: "127.0.0.1:{self.admin}" }}
workers_dir: workers
logs_dir: logs
run_dir: run
ports: "{self.lo}-{self.hi}"
proxy: {{ {proxy} }}
log: {{ level: info }}
cgroups: {cg}
{self.top}
""")

    def write_worker(self, name, text):
        d = os.path.join(self.tmp, "workers", name)
        os.makedirs(d, exist_ok=True)
        # Atomic (write + rename): a reload running meanwhile must never read a half-written file.
        tmp = os.path.join(d, ".worker.yaml.tmp")
        with open(tmp, "w") as f:
            f.write(f"# generated by load-tests/reliability ({self.name})\n" + text)
        os.replace(tmp, os.path.join(d, "worker.yaml"))

    # -- processes

    def spawn(self, cmd, out, **kw):
        f = open(out, "ab")
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kw)
        f.close()
        self.procs.append(p)
        return p

    def cli(self, *a, timeout=120):
        """Runs `tqproxy -c CFG ARGS...`: a CompletedProcess (text)."""
        return subprocess.run([TQPROXY, "-c", self.cfg, *a], capture_output=True, text=True, timeout=timeout)

    def start(self, ready=None, timeout=60):
        """Starts tqproxy; waits until every worker in ready ({name: n}) has n routed ready
        instances (all configured workers with >= 1 if ready is None)."""
        r = self.cli("check")
        if r.returncode:
            raise RuntimeError(f"tqproxy check failed: {r.stdout}{r.stderr}")
        self.tq = self.spawn([TQPROXY, "-c", self.cfg, "run"], os.path.join(self.tmp, "tqproxy.out"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.tq.poll() is not None:
                raise RuntimeError(f"tqproxy exited {self.tq.returncode}: {self.tail()}")
            st = self.status()
            if st:
                want = ready or {w["name"]: 1 for w in st["workers"]}
                if all(len(self.ready_instances(n)) >= k for n, k in want.items()):
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"workers not ready within {timeout} s: {self.tail()}")

    def tail(self, n=20):
        try:
            with open(os.path.join(self.tmp, "tqproxy.out"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def status(self):
        try:
            s, body = http_get(self.admin, "/status.json", timeout=2)
            return json.loads(body) if s == 200 else None
        except (OSError, ValueError, http.client.HTTPException):
            return None

    def worker(self, name):
        st = self.status()
        return next((w for w in st["workers"] if w["name"] == name), None) if st else None

    def ready_instances(self, name):
        w = self.worker(name)
        return [i for i in (w or {}).get("instances", []) if i.get("routed") and i.get("state") == "ready"]

    def wait(self, pred, timeout, step=0.05):
        """Polls pred() until true or timeout; returns whether it became true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(step)
        return bool(pred())

    def wait_ready(self, name, n, timeout=30):
        return self.wait(lambda: len(self.ready_instances(name)) >= n, timeout)

    def metrics(self):
        """/metrics as {"name{labels}": value}."""
        try:
            s, body = http_get(self.admin, "/metrics", timeout=2)
        except (OSError, http.client.HTTPException):
            return {}
        out = {}
        for line in body.decode(errors="replace").splitlines():
            if line.startswith("#") or not line.strip():
                continue
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) ([-+\d.eE]+|NaN|\+Inf)$", line)
            if m:
                try:
                    out[m.group(1)] = float(m.group(2))
                except ValueError:
                    pass
        return out

    def tq_pid(self):
        """The pid of the tqproxy serving now (the upgraded one after follow_pid())."""
        if self.tq_pid_override:
            return self.tq_pid_override
        return self.tq.pid if self.tq else None

    def follow_pid(self, pid):
        """After `tqproxy upgrade`: the new process (not our child) is the stack's tqproxy."""
        self.tq_pid_override = pid

    def tq_alive(self):
        pid = self.tq_pid()
        if pid is None:
            return False
        if self.tq and pid == self.tq.pid:
            return self.tq.poll() is None
        return pid_alive(pid)

    def stats(self):
        pid = self.tq_pid()
        return proc_stats(pid) if pid else {}

    def instance_pids(self):
        return descendants(self.tq_pid()) if self.tq_alive() else []

    def stop(self):
        pid = self.tq_pid_override
        if pid and (not self.tq or pid != self.tq.pid) and pid_alive(pid):
            # An upgraded tqproxy: not our child, so signal it and poll /proc until it is gone.
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if pid_alive(pid):
                log(f"  pid {pid} did not stop within 30 s: SIGKILL")
                os.kill(pid, signal.SIGKILL)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log(f"  pid {p.pid} did not stop within 30 s: SIGKILL")
                p.kill()
                p.wait()

    def leaks(self):
        """After stop(): what this stack left behind, as a list of strings (goal: empty).
        Processes whose command line or environment names the temp dir, listening ports in the
        stack's worker port block, and instance cgroups under the stack's base."""
        out = []
        time.sleep(0.2)
        pids = sorted(set(pids_with_cmdline_containing(self.tmp)) | set(self.instance_like_pids()))
        if pids:
            out.append(f"{len(pids)} processes ({', '.join(map(str, pids[:8]))})")
        ports = self.own_ports(listening_ports(self.lo, self.hi) | (listening_ports(self.port, self.port)))
        if ports:
            out.append(f"{len(ports)} listening ports ({', '.join(map(str, sorted(ports)[:8]))})")
        if self.cgroups != "off":
            cg = cgroup_leftovers(self.cg_base)
            if cg:
                out.append(f"{len(cg)} cgroups ({cg[0]}...)")
        return out

    def is_ours(self, pid):
        """pid belongs to this stack: names the temp dir (command line or environment), sits in one
        of the stack's cgroups, or is a worker instance (WORKER_NAME set) given a port of the
        stack's block (PORT in [lo, hi]) — an instance's command line names neither."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().decode(errors="replace")
        except OSError:
            return False
        if self.tmp in cmd or self.tmp in env:
            return True
        if self.cgroups != "off":
            try:
                with open(f"/proc/{pid}/cgroup") as f:
                    if f"/{self.cg_base}/" in f.read():
                        return True
            except OSError:
                pass
        vars_ = dict(kv.split("=", 1) for kv in env.split("\0") if "=" in kv)
        port = vars_.get("WORKER_PORT") or vars_.get("PORT")
        return "WORKER_NAME" in vars_ and bool(port and port.isdigit() and self.lo <= int(port) <= self.hi)

    def instance_like_pids(self):
        """Live processes (not tqproxy itself) that is_ours() claims."""
        me, tq = os.getpid(), self.tq_pid()
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit() and int(d) not in (me, tq) and pid_alive(int(d)) and self.is_ours(int(d)):
                out.append(int(d))
        return out

    def own_ports(self, ports):
        """The ports of `ports` whose listening socket is held by a process of this stack (or by no
        process found: reported too). Another stack's instances may listen inside this block: a
        concurrent run (other people's tests) picks its block without knowing ours."""
        if not ports:
            return set()
        holders = port_holders(ports)
        return {p for p in ports if not holders.get(p) or any(self.is_ours(h) or h == self.tq_pid()
                                                             for h in holders[p])}

    def running_leaks(self):
        """While tqproxy runs (after the faults, once settled): what it holds for instances that
        are no longer alive, as a list of strings (goal: empty). Compares /status.json's live
        instances with tqproxy's descendants (extra or zombie processes), the listening ports in
        the worker port block, the instance cgroups under <base>/<tqproxy pid>/, and tqproxy's
        fds: files under logs/ (one per worker: logs/<worker>.log, rotated files closed), pipes
        (stdout + stderr per live instance) and pidfds (one per live instance)."""
        out = []
        pid = self.tq_pid()
        st = self.status()
        if not st or not pid:
            return ["tqproxy did not answer /status.json"]
        live = [i for w in st["workers"] for i in w["instances"] if i.get("state") != "exited" and i.get("pid")]
        live_pids = {i["pid"] for i in live}
        live_ports = {i["port"] for i in live if i.get("port")}
        desc = descendants(pid)
        zombies = [d for d in desc if not pid_alive(d)]
        if zombies:
            out.append(f"{len(zombies)} zombie children ({', '.join(map(str, zombies[:8]))})")
        # An instance's own children (a sandbox helper, a forked child) are not in the status:
        # count only tqproxy's direct children that are not a live instance.
        direct = [d for d in desc if pid_alive(d) and _ppid(d) == pid]
        extra = [d for d in direct if d not in live_pids]
        if extra:
            out.append(f"{len(extra)} child processes not in the status ({', '.join(map(str, extra[:8]))})")
        ports = self.own_ports(listening_ports(self.lo, self.hi) - live_ports)
        if ports:
            out.append(f"{len(ports)} listening worker ports of no live instance ({', '.join(map(str, sorted(ports)[:8]))})")
        if self.cgroups != "off":
            names = {os.path.basename(i["cgroup"]) for w in st["workers"] for i in w["instances"]
                     if i.get("state") != "exited" and i.get("cgroup")}
            stale = set()
            for d in cgroup_dirs(self.cg_base):
                base = os.path.join(d, str(pid))
                try:
                    for n in os.listdir(base):
                        if os.path.isdir(os.path.join(base, n)) and n not in names:
                            stale.add(n)
                except OSError:
                    pass
            if stale:
                out.append(f"{len(stale)} instance cgroups of no live instance ({', '.join(sorted(stale)[:6])})")
        fds = fd_targets(pid)
        logs = os.path.join(self.tmp, "logs") + "/"
        log_fds = [t for t in fds.values() if t.startswith(logs)]
        workers = {os.path.join(self.tmp, "logs", w["name"] + ".log") for w in st["workers"]}
        # logs/tqproxy.log is an upgraded tqproxy's own stdout/stderr (`tqproxy upgrade`).
        log_fds = [t for t in log_fds if t != os.path.join(self.tmp, "logs", "tqproxy.log")]
        bad_logs = [t for t in log_fds if t not in workers]
        dup = len(log_fds) - len(set(log_fds))
        if bad_logs or dup:
            out.append(f"{len(bad_logs) + dup} log handles beyond one per worker ({', '.join(sorted(set(bad_logs))[:4])})")
        kinds = fd_kinds(pid)
        if kinds.get("pidfd", 0) > len(live):
            out.append(f"{kinds['pidfd']} pidfds for {len(live)} live instances")
        if kinds.get("pipe", 0) > 2 * len(live) + 2:
            out.append(f"{kinds['pipe']} pipes for {len(live)} live instances (2 each expected)")
        return out

    def cleanup(self):
        """Kills what leaks() found (by pid), removes the cgroup base and the temp dir."""
        for p in set(pids_with_cmdline_containing(self.tmp)) | set(self.instance_like_pids()):
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
        for d in sorted(cgroup_dirs(self.cg_base) + cgroup_leftovers(self.cg_base), key=len, reverse=True):
            try:
                os.rmdir(d)
            except OSError:
                pass
        if self.keep:
            log(f"  kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        self.cleanup()
        return False


def guarded(ctx, group, scenario, fn, load="-", faults="-"):
    """Runs fn() -> Row (or list of Rows); an exception becomes one failed row that carries the
    traceback's last line (the group goes on with its next scenario). Each row is emitted."""
    import traceback
    t0 = time.monotonic()
    try:
        rows = fn()
    except Exception as e:  # noqa: BLE001 - one scenario's failure must not stop the others
        tb = traceback.format_exc().strip().splitlines()
        rows = Row(group, scenario, load, faults, ok=False, lost="unknown (the scenario failed)",
                   goal="the scenario runs", notes=f"scenario failed: {tb[-1] if tb else e!r}")
        log("  " + "\n  ".join(tb[-6:]))
    rows = rows if isinstance(rows, list) else [rows]
    for r in rows:
        if not r.duration_s:
            r.duration_s = time.monotonic() - t0
        ctx.emit(r)
    return rows


def worker_yaml(command, instances=1, routes=("/",), env=None, extra="", health="/health"):
    """A worker.yaml text: command (a path or a list), routes, instances, env, health, extra."""
    cmd = command if isinstance(command, (list, tuple)) else [command]
    env = {"WORKER_THREADS": "1", **(env or {})}
    h = (f"health: {{ path: {health}, interval: 1s, timeout: 500ms, unhealthy_after: 3 }}\n"
         if health else "")
    return (f"command: {json.dumps(list(cmd))}\n"
            f"routes: {json.dumps(list(routes))}\n"
            f"instances: {instances}\n"
            f"env: {json.dumps(env)}\n" + h + extra)


# ---------------------------------------------------------------------------------------------
# load: wrk, counting every response that is not 2xx

COUNT_LUA = r"""
-- Counts every response by status class; wrk prints socket errors itself.
local threads = {}
function setup(thread) table.insert(threads, thread) end
ok, bad = 0, 0
bad_codes = ""
function response(status, headers, body)
  if status >= 200 and status < 300 then
    ok = ok + 1
  else
    bad = bad + 1
    if #bad_codes < 200 then bad_codes = bad_codes .. status .. " " end
  end
end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    print(string.format("lua_ok=%d lua_bad=%d lua_bad_codes=[%s]", t:get("ok"), t:get("bad"),
                        t:get("bad_codes")))
  end
end
"""


def ensure_tools(*tools):
    missing = [t for t in tools if not shutil.which(t)]
    if missing:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)


def _dur_ms(v, unit):
    v = float(v)
    return v * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


@dataclasses.dataclass
class LoadResult:
    requests: int
    failed: int             # non-2xx + socket errors (connect, read, write, timeout)
    non2xx: int
    socket_errors: list     # [connect, read, write, timeout]
    bad_codes: str
    p50_ms: float
    p99_ms: float
    rps: float
    raw: str

    def summary(self):
        return (f"{self.requests} requests, {self.failed} failed (non-2xx {self.non2xx} [{self.bad_codes.strip()}], "
                f"socket errors c/r/w/t {'/'.join(map(str, self.socket_errors))}), p50 {self.p50_ms:.2f} ms, "
                f"p99 {self.p99_ms:.2f} ms, {self.rps:.0f} req/s")


class Load:
    """wrk -t1 -cC --latency against url, in the background until stop() (or duration).

        load = Load(st.port, "/", connections=16).start()
        ... faults ...
        res = load.stop()    # LoadResult

    rate: if set, wrk is not used for an open-loop rate; keep the load steady by connections.
    """

    def __init__(self, port, path="/", connections=16, duration=3600, host=None, timeout="10s",
                 tmp=None, extra_lua=""):
        self.url = f"http://127.0.0.1:{port}{path}"
        self.connections = connections
        self.duration = duration
        self.host = host
        self.timeout = timeout
        self.tmp = tmp or tempfile.mkdtemp(prefix="tqrel-wrk-")
        self._own_tmp = tmp is None
        self.lua = os.path.join(self.tmp, f"count-{random.randint(0, 1 << 30):x}.lua")
        self.out = self.lua[:-4] + ".out"
        with open(self.lua, "w") as f:
            f.write(COUNT_LUA + extra_lua)
        self.p = None

    def start(self, settle=0.5):
        cmd = ["wrk", "-t1", f"-c{self.connections}", f"-d{self.duration}s", "--latency",
               "--timeout", self.timeout, "-s", self.lua]
        if self.host:
            cmd += ["-H", f"Host: {self.host}"]
        cmd.append(self.url)
        with open(self.out, "wb") as f:
            self.p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        LOADS.append(self)
        time.sleep(settle)
        return self

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
        try:
            self.p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        with open(self.out, errors="replace") as f:
            out = f.read()
        if self._own_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return parse_wrk(out)


def parse_wrk(out):
    m = re.search(r"(\d+) requests in", out)
    req = int(m.group(1)) if m else 0
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    sock = [int(x) for x in se.groups()] if se else [0, 0, 0, 0]
    lb = re.search(r"lua_bad=(\d+) lua_bad_codes=\[([^\]]*)\]", out)
    non2xx = int(lb.group(1)) if lb else 0
    codes = lb.group(2) if lb else ""
    if not lb:
        n2 = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        non2xx = int(n2.group(1)) if n2 else 0

    def pct(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        return _dur_ms(*m.groups()) if m else float("nan")
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return LoadResult(req, non2xx + sum(sock), non2xx, sock, codes, pct(50), pct(99),
                      float(rps.group(1)) if rps else 0.0, out)


# ---------------------------------------------------------------------------------------------
# the result row

@dataclasses.dataclass
class Row:
    group: str                  # the module's GROUP
    scenario: str               # e.g. "kill -9 every 200 ms + reload 3 s + scale 10 s + restart 7 s"
    load: str                   # the load held, e.g. "wrk -c16 keep-alive GET / for 300 s"
    faults: str                 # what was injected, with counts, e.g. "1 492 kill -9, 100 reloads"
    requests: int = 0
    failed: int = 0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    base_p50_ms: float = float("nan")   # the same load without the fault
    base_p99_ms: float = float("nan")
    start: dict = dataclasses.field(default_factory=dict)   # proc_stats() of tqproxy at the start
    end: dict = dataclasses.field(default_factory=dict)     # ... and at the end
    lost: str = "nothing"       # what was lost, in words ("nothing", "3 requests (502)", ...)
    goal: str = ""              # the goal this row checks, in words
    ok: bool = True             # the goal was met
    reproduce: str = ""         # the command that reproduces this row
    notes: str = ""             # anything else a reader needs (figures beyond the columns)
    duration_s: float = 0.0
    ci_fatal: bool = True       # with --ci, a missed goal fails the run (False: a figure, e.g. a p99
                                # ratio on a shared machine, that is reported but does not fail CI)

    def ratio99(self):
        if self.base_p99_ms and self.base_p99_ms == self.base_p99_ms and self.p99_ms == self.p99_ms:
            return self.p99_ms / self.base_p99_ms
        return float("nan")

    def to_json(self):
        return dataclasses.asdict(self)

    def line(self):
        r = self.ratio99()
        return (f"  [{'ok' if self.ok else 'MISS'}] {self.group}/{self.scenario}: {self.requests} requests, "
                f"{self.failed} failed, p99 {self.p99_ms:.2f} ms (baseline {self.base_p99_ms:.2f}, "
                f"x{r:.2f}), tqproxy {fmt_stats(self.start)} -> {fmt_stats(self.end)}; lost: {self.lost}"
                + (f"; {self.notes}" if self.notes else ""))


def within(a, b, frac):
    """a within ±frac of b (both numbers; None counts as not within)."""
    if a is None or b is None:
        return False
    return abs(a - b) <= frac * max(b, 1)


class Background:
    """A daemon thread running self._run() until stop(): subclasses loop on `self._stop`
    (`while not self._stop.is_set(): ...; self._stop.wait(interval)`)."""

    JOIN_TIMEOUT = 5

    def __init__(self):
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        raise NotImplementedError

    def start(self):
        self._t.start()
        return self

    def stop(self):
        self._stop.set()
        self._t.join(timeout=self.JOIN_TIMEOUT)
        return self


class Sampler(Background):
    """Samples proc_stats(pid) every interval in a thread; .max('rss_kb') afterwards."""

    def __init__(self, pid, interval=0.5):
        super().__init__()
        self.pid = pid
        self.interval = interval
        self.samples = []

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(proc_stats(self.pid))
            self._stop.wait(self.interval)

    def max(self, key):
        vals = [s[key] for s in self.samples if s.get(key) is not None]
        return max(vals) if vals else None


# ---------------------------------------------------------------------------------------------
# helpers for soak-style scenarios (added for chaos, swaps, ownfaults)

def baseline(port, secs, path="/", connections=16, host=None):
    """The same load without any fault, for secs: a LoadResult (its p50/p99 are the baseline)."""
    load = Load(port, path, connections=connections, host=host).start(settle=0)
    try:
        time.sleep(secs)
    finally:
        res = load.stop()
    return res


def metric_delta(m0, m1, *prefixes):
    """{name: m1 - m0} for metrics starting with one of prefixes, non-zero only."""
    out = {}
    for k, v in m1.items():
        if any(k.startswith(p) for p in prefixes):
            d = v - m0.get(k, 0)
            if d:
                out[k] = d
    return out


def fmt_delta(d):
    return ", ".join(f"{k.replace('tqproxy_', '')}={v:g}" for k, v in sorted(d.items())) or "none"


def inject_leak(st):
    """--inject-leak: a detached `sleep` that names the stack's temp dir (as a worker that forked
    and detached would), so that st.leaks() must report it. Returns its pid."""
    p = subprocess.Popen(["sleep", "120"], env=dict(os.environ, TQREL_LEAK=st.tmp), stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log(f"  --inject-leak: left pid {p.pid} (sleep naming {st.tmp}) behind on purpose")
    return p.pid


def stats_ok(start, end, frac=0.10, keys=("rss_kb", "fds")):
    """(ok, why): end within ±frac of start for each key."""
    bad = []
    for k in keys:
        if not within(end.get(k), start.get(k), frac):
            bad.append(f"{k} {start.get(k)} -> {end.get(k)}")
    return (not bad), "; ".join(bad)


def pct_ms(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return 1000 * xs[min(len(xs) - 1, int(q * len(xs)))]


def reproduce(ctx, group):
    """The command that reproduces a group's rows at the same length."""
    return f"sudo load-tests/reliability --no-build --only {group}" + (
        " --ci" if ctx.ci else " --quick" if ctx.quick else "")


def cli_summary(calls):
    """calls: [(verb, rc, seconds, message)] -> "reload 10/10 ok (median 0.8 s, max 2.1 s); ..."."""
    import statistics
    by = {}
    for verb, rc, secs, msg in calls:
        by.setdefault(verb, []).append((rc, secs, msg))
    out = []
    for verb, xs in by.items():
        ok = sum(1 for rc, _, _ in xs if rc == 0)
        d = [s for _, s, _ in xs]
        out.append(f"{verb} {ok}/{len(xs)} exit 0 (median {statistics.median(d):.2f} s, max {max(d):.2f} s)")
    return "; ".join(out)


def cleanup_all():
    """Last resort (the runner's finally): stops every wrk and Stack this process started that is
    still there, unmounts what is mounted under a stack's temp dir, removes the temp dirs."""
    for ld in LOADS:
        if ld.p and ld.p.poll() is None:
            ld.p.kill()
            ld.p.wait()
    for st in STACKS:
        if not os.path.exists(st.tmp):
            continue
        try:
            st.stop()
        except Exception as e:  # noqa: BLE001
            log(f"  cleanup: stopping {st.tmp}: {e}")
        try:
            with open("/proc/self/mounts") as f:
                mnts = [ln.split()[1] for ln in f if ln.split()[1].startswith(st.tmp + "/")]
        except OSError:
            mnts = []
        for m in sorted(mnts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        st.cleanup()
