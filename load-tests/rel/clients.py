"""Group 4 of `load-tests/reliability` (issue 11): abusive clients.

One stack (`hello` x3 on "/", `rawecho` on host `a.test` for the smuggling corpus; tqproxy with
client_header_timeout 5 s (2 s with --quick), client_keepalive_timeout 300 s, client_body_timeout
30 s, upstream_idle_timeout 2 s so that the upstream pool's fds settle, max_connections 12000,
RLIMIT_NOFILE raised) and a victim load, `wrk -t1 -c4` keep-alive GET / on it throughout each
scenario. The baseline is the victim alone. Each abuse is one row: the victims' requests, failed,
p50/p99 against the baseline (goal <= 1.5x, 0 failed), the memory tqproxy kept (its RSS max during
the abuse, per abusive connection where it means something), and its RSS/fds/threads from before
the abuse to after the abusers left (fds back to the start value, +-8 for the upstream pool):

1. slowloris: N connections (1 000; 100 with ci) sending a head line every ~1 s, never ending the
   head: each must be closed by tqproxy within [timeout - 0.3 s, timeout + 2 s] of its connect;
2. slow readers: 200 clients (SO_RCVBUF 4 KiB) asking /bytes/1048576 and reading 1 KiB a second:
   tqproxy's RSS growth per slow client must stay <= 128 KiB (its windows are 16 + 32 KiB; buffering
   the whole answer would be 1 MiB each);
3. 10 000 idle keep-alive connections (2 000 with --quick), one GET / each: RSS growth per
   connection <= 4 096 bytes (the engine's target), a second GET on 200 of them answered;
4. header floods: 1 000 small headers, and one 70 000-byte header (beyond the 64 KiB head limit):
   each must get 431 (or 400) and then EOF;
5. pipelining floods: 50 connections (SO_RCVBUF 4 KiB) each writing 10 000 pipelined GET /bytes/1024
   (256-byte requests; 10 MB of answers, more than tqproxy's socket send buffer holds) without
   reading for 8 s: tqproxy must stop reading (anon RSS growth <= 256 KiB per connection), then,
   when they read, every connection is answered in full or closed by tqproxy (within 90 s);
6. a connection flood beyond max_connections (own stack, max_connections 200, victims connected
   first): 2 000 connections, one GET / each, kept open: those beyond the limit get 503 and EOF,
   the victims are unaffected, and after the flood new connections get 200 again;
7. resets: 2 000 clients that send half a head or half a body and reset (SO_LINGER 0), and 2 000
   that ask /bytes/1048576, read 4 KiB and reset: fds back, anon RSS not growing from the first
   quarter of the batches to the last (+ 2 MiB or 20 %), in-flight 0 in /status.json once the
   victims stopped;
8. the request-smuggling corpus: the rejected requests of `tests/it/conformance.rs`
   (`rejected_cases()`, parsed from the Rust source: its string literals and the three computed
   heads, checked by count), each sent with a pipelined `GET /__smuggled-<n>` after it to the
   rawecho worker: each must get its expected status (s65: 200 then 400), then EOF, and the
   rawecho log must hold no smuggled request, no `req` but the sentinel's and s65's first, and for
   the bad-chunked cases at most their own partial head. Replayed here rather than running
   `cargo test --release --test it conformance` because this row is about the victims of a stack
   under that corpus (the cargo test starts its own stack, may rebuild the crate on a shared tree,
   and checks byte-exact forwarding, which is its job, not this group's).

Run alone: `load-tests/rel/clients.py [--quick] [--ci] [--keep] [--only 1,3] [--header-timeout S]`
(`--ci --config-header-timeout 30` shows the slowloris check failing when tqproxy does not close in
time: tqproxy gets 30 s, the check expects 2 s).
"""

import errno
import os
import re
import resource
import selectors
import socket
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import (BACKEND, RAWECHO, Load, Row, Sampler, Stack, log, proc_stats,  # noqa: E402
                    worker_yaml)

GROUP = "clients"
TITLE = "Abusive clients"

VICTIMS = 4
MAX_CONNS = 12000
FLOOD_MAX = 200
FD_TOL = 8
KIB = 1024
REPRO = "load-tests/reliability --only clients"
CONFORMANCE = os.path.join(common.REPO, "tests", "it", "conformance.rs")
LINGER0 = struct.pack("ii", 1, 0)


# ---------------------------------------------------------------------------------------------
# small helpers

def raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need and os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                cap = int(f.read())
        except (OSError, ValueError):
            cap = 1 << 20
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, cap), min(need, cap)))
        except (ValueError, OSError) as e:
            log(f"  cannot raise RLIMIT_NOFILE to {need}: {e}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rst(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER0)
    except OSError:
        pass
    sock.close()


def nb_socket(port, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setblocking(False)
    rc = s.connect_ex(("127.0.0.1", port))
    if rc not in (0, errno.EINPROGRESS):
        s.close()
        raise OSError(rc, os.strerror(rc))
    return s


def response_done(buf):
    """(status, complete, end) of the first HTTP/1.1 response in buf; status 0 while its head is
    incomplete, end = the offset after it (when complete)."""
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        return 0, False, 0
    lines = buf[:i].decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        return -1, True, len(buf)
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip().lower()
    if status < 200 or status in (204, 304):
        return status, True, i + 4
    if "content-length" in hdrs:
        try:
            n = int(hdrs["content-length"])
        except ValueError:
            return status, True, len(buf)
        return status, len(buf) - i - 4 >= n, i + 4 + n
    if "chunked" in hdrs.get("transfer-encoding", ""):
        j = buf.find(b"0\r\n\r\n", i + 4)
        return status, j >= 0, j + 5
    return status, False, 0


class C:
    """One client connection driven by `drive`: connect, send `out`, read `want` responses, then
    (with `eof`) wait for the server to close."""
    __slots__ = ("sock", "state", "out", "buf", "statuses", "err", "t0", "t_end", "want", "eof", "closed")

    def __init__(self, sock, out, want=1, eof=False):
        self.sock, self.out, self.want, self.eof = sock, out, want, eof
        self.state, self.buf, self.statuses, self.err = "connect", b"", [], None
        self.t0, self.t_end, self.closed = time.monotonic(), None, False


def drive(conns, timeout):
    """Runs every C on one selector until done (its responses read, and EOF if asked) or timeout.
    state ends 'done', 'failed' or 'timeout'; closed = the server closed (EOF or reset)."""
    sel = selectors.DefaultSelector()
    live = 0
    for c in conns:
        if c.sock is None:
            continue
        sel.register(c.sock, selectors.EVENT_WRITE, c)
        live += 1
    deadline = time.monotonic() + timeout

    def finish(c, state, err=None):
        nonlocal live
        c.state, c.err, c.t_end = state, err, time.monotonic()
        sel.unregister(c.sock)
        live -= 1

    while live and time.monotonic() < deadline:
        for key, _ in sel.select(max(0.0, min(0.5, deadline - time.monotonic()))):
            c = key.data
            if c.state == "connect":
                e = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if e:
                    finish(c, "failed", f"connect: {os.strerror(e)}")
                    continue
                c.state = "send"
            if c.state == "send":
                try:
                    n = c.sock.send(c.out)
                except BlockingIOError:
                    continue
                except OSError as e:
                    # the server may have answered and closed before taking it all (431)
                    c.state = "read"
                    sel.modify(c.sock, selectors.EVENT_READ, c)
                    c.err = f"send: {e.strerror or e}"
                    continue
                c.out = c.out[n:]
                if not c.out:
                    c.state = "read"
                    sel.modify(c.sock, selectors.EVENT_READ, c)
                continue
            try:
                data = c.sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as e:
                c.closed = True
                finish(c, "done" if len(c.statuses) >= c.want else "failed", f"recv: {e.strerror or e}")
                continue
            if not data:
                c.closed = True
                finish(c, "done" if len(c.statuses) >= c.want else "failed",
                       "EOF" + (" mid-response" if c.buf else ""))
                continue
            c.buf += data
            while c.buf:
                st, complete, end = response_done(c.buf)
                if not complete:
                    break
                c.statuses.append(st)
                c.buf = c.buf[end:]
            if len(c.statuses) >= c.want and not c.eof and c.state == "read":
                finish(c, "done")
    for c in conns:
        if c.state not in ("done", "failed"):
            c.state, c.err = "timeout", f"timeout in {c.state}"
            c.t_end = time.monotonic()
    sel.close()
    return conns


def in_batches(port, n, out, batch, timeout, want=1, eof=False, rcvbuf=None, keep=False):
    """n connections, `batch` at a time, each driven by `drive`; closed (RST) unless keep."""
    done = []
    for lo in range(0, n, batch):
        cs = []
        for _ in range(min(batch, n - lo)):
            try:
                cs.append(C(nb_socket(port, rcvbuf), out, want, eof))
            except OSError as e:
                c = C(None, b"", want, eof)
                c.state, c.err = "failed", f"socket: {e}"
                cs.append(c)
        drive(cs, timeout)
        if not keep:
            for c in cs:
                if c.sock:
                    rst(c.sock)
        done.extend(cs)
    return done


def tally(items):
    out = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def fmt_tally(d):
    return ", ".join(f"{k}: {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "none"


def anon_kb(pid):
    """RssAnon of pid, KiB: the heap; VmRSS also counts the binary's pages as code paths first
    run (tqproxy's 64 MB binary adds MiBs of those during a scenario)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class AnonSampler(Sampler):
    """common.Sampler's samples, each with "anon_kb" (RssAnon) too."""

    def _run(self):
        while not self._stop.is_set():
            s = proc_stats(self.pid)
            s["anon_kb"] = anon_kb(self.pid)
            self.samples.append(s)
            self._stop.wait(self.interval)


def settle_rss(pid, n=3, every=0.5):
    """The last of n RssAnon readings `every` s apart, KiB."""
    out = []
    for _ in range(n):
        time.sleep(every)
        out.append(anon_kb(pid))
    return out[-1]


def tcp_queues(port):
    """{(local port, remote port): (tx_queue, rx_queue)} of the established TCP sockets on
    loopback that have `port` at one end, from /proc/net/tcp."""
    out = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[3] != "01":
                continue
            lp, rp = int(parts[1].rsplit(":", 1)[1], 16), int(parts[2].rsplit(":", 1)[1], 16)
            if port in (lp, rp):
                tx, rx = (int(x, 16) for x in parts[4].split(":"))
                out[(lp, rp)] = (tx, rx)
    return out


def in_flight(st):
    s = st.status()
    if not s:
        return None
    return sum(w.get("in_flight", 0) for w in s.get("workers", []))


# ---------------------------------------------------------------------------------------------
# the request-smuggling corpus, from tests/it/conformance.rs

_ESC = {"r": "\r", "n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'", "0": "\0"}


def _rust_str(src, i):
    """Parses a Rust "..." or b"..." literal at src[i]: (bytes, index after it)."""
    if src[i] == "b":
        i += 1
    assert src[i] == '"', src[i:i + 20]
    i += 1
    out = bytearray()
    while src[i] != '"':
        ch = src[i]
        if ch == "\\":
            nx = src[i + 1]
            if nx == "x":
                out.append(int(src[i + 2:i + 4], 16))
                i += 4
                continue
            if nx == "\n":  # line continuation
                i += 2
                while src[i] in " \t\n":
                    i += 1
                continue
            out.extend(_ESC[nx].encode("latin-1"))
            i += 2
            continue
        out.extend(ch.encode("utf-8"))
        i += 1
    return bytes(out), i + 1


def _skip(src, i, chars=" ,\n\t"):
    while src[i] in chars:
        i += 1
    return i


def smuggling_corpus(path=CONFORMANCE):
    """[(name, bytes, expected statuses, kind)] from rejected_cases(); kind "reject",
    "bad_chunked" (the worker may see the head) or "pipelined" (s65: [200, 400])."""
    with open(path, encoding="utf-8") as f:
        src = f.read()
    a = src.index("fn rejected_cases()")
    b = src.index("\n}\n", a)
    body = src[a:b]
    host = "a.test"
    P = f"POST / HTTP/1.1\r\nHost: {host}\r\n".encode()
    # the three computed heads, as rejected_cases() builds them
    computed = {
        "long_line": f"GET /{'a' * 9000} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode(),
        "big_head": ("GET / HTTP/1.1\r\nHost: a.test\r\n" + "".join(
            f"X-Big-{i}: {'b' * 8000}\r\n" for i in range(9)) + "\r\n").encode(),
        "many_headers": ("GET / HTTP/1.1\r\nHost: a.test\r\n" + "".join(
            f"X-H-{i}: {i}\r\n" for i in range(100)) + "\r\n").encode(),
    }
    for k in computed:  # the definitions must still be the ones mirrored here
        if f"let {k} =" not in body:
            raise RuntimeError(f"conformance.rs: rejected_cases() no longer defines {k}")
    if 'repeat(9000)' not in body or 'for i in 0..9' not in body or 'for i in 0..100' not in body:
        raise RuntimeError("conformance.rs: rejected_cases()'s computed heads changed")
    out = []
    for m in re.finditer(r"^\s+(reject|bad_chunked)\(", body, re.M):
        kind = m.group(1)
        i = m.end()
        name, i = _rust_str(body, i)
        i = _skip(body, i)
        if kind == "reject":
            if body.startswith("post(", i):
                rest, i = _rust_str(body, i + 5)
                data = P + rest
                i += 1
            elif body[i] == '"' or body.startswith('b"', i):
                data, i = _rust_str(body, i)
            else:
                ident = re.match(r"[a-z_]+", body[i:]).group(0)
                data = computed[ident]
                i += len(ident)
            i = _skip(body, i)
            codes = [int(x) for x in re.match(r"&\[([\d, ]+)\]", body[i:]).group(1).split(",")]
            out.append((name.decode(), data, codes, "reject"))
        else:
            rid, i = _rust_str(body, i)
            i = _skip(body, i)
            good, i = _rust_str(body, i)
            i = _skip(body, i)
            bad, i = _rust_str(body, i)
            head = (f"POST /c HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
                    f"X-Request-Id: {rid.decode()}\r\n\r\n").encode()
            out.append((name.decode(), head + good + bad, [400], "bad_chunked"))
    # the one `case(...)`: a valid request, then garbage
    m = re.search(r'case\(\s*"(s65[^"]*)",\s*"((?:[^"\\]|\\.)*)"', body)
    if m:
        data, _ = _rust_str(body, m.start(2) - 1)
        out.append((m.group(1), data, [200, 400], "pipelined"))
    expected = len(re.findall(r"^\s+(?:reject|bad_chunked)\(", body, re.M)) + len(re.findall(r"^\s+case\(", body, re.M))
    if len(out) != expected:
        raise RuntimeError(f"conformance.rs: parsed {len(out)} of {expected} rejected cases")
    return out


def read_rawecho_log(path):
    recs = []
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return recs
    i = 0
    while i < len(data):
        j = data.index(b"\n", i)
        conn, kind, n = data[i:j].decode().split()
        n = int(n)
        recs.append((int(conn), kind, data[j + 1:j + 1 + n]))
        i = j + 1 + n + 1
    return recs


# ---------------------------------------------------------------------------------------------
# the group

class Group:
    def __init__(self, ctx):
        self.ctx = ctx
        self.quick = ctx.quick
        self.ci = getattr(ctx, "ci", False)
        ht = getattr(ctx, "header_timeout", None)
        self.header_timeout = ht if ht else (2.0 if (self.quick or self.ci) else 5.0)
        self.dur = 2.0 if self.ci else (3.0 if self.quick else 8.0)   # victim baseline seconds
        self.rows = []
        self.base = None

    # -- per scenario

    def measure(self, st, name, faults, fn, goal, after=None):
        """Victims on, start stats, fn() (returns (ok, notes, lost, maxima...)), abusers gone,
        fds settle, end stats, victims off: one Row."""
        log(f"  {name} ...")
        t_begin = time.monotonic()
        load = Load(st.port, "/", connections=VICTIMS, tmp=st.tmp, timeout="5s").start(settle=0.5)
        start = dict(st.stats(), anon_kb=anon_kb(st.tq.pid))
        samp = AnonSampler(st.tq.pid, 0.1).start()
        try:
            ok, notes, lost = fn(st, start, samp)
        except Exception:
            load.stop()
            samp.stop()
            raise
        # the abusers are gone: fds back (the upstream pool's idle connections expire in 2 s)
        st.wait(lambda: (st.stats().get("fds") or 1 << 30) <= start["fds"] + FD_TOL, 10, step=0.25)
        end = dict(st.stats(), anon_kb=anon_kb(st.tq.pid))
        samp.stop()
        res = load.stop()
        if after:  # checks that need the victims gone (their own requests count as in-flight)
            ok2, notes2 = after(st)
            ok = ok and ok2
            notes += "; " + notes2
        r = Row(GROUP, name, f"victims: wrk -t1 -c{VICTIMS} keep-alive GET /", faults,
                requests=res.requests, failed=res.failed, p50_ms=res.p50_ms, p99_ms=res.p99_ms,
                base_p50_ms=self.base.p50_ms if self.base else float("nan"),
                base_p99_ms=self.base.p99_ms if self.base else float("nan"),
                start=start, end=end, goal=goal, reproduce=REPRO + (" --quick" if self.quick else ""),
                duration_s=time.monotonic() - t_begin)
        misses = []
        if not ok:
            misses.append("scenario check")
        if res.failed:
            misses.append(f"{res.failed} victim requests failed")
        if res.requests == 0:
            misses.append("the victims made no request")
        ratio = r.ratio99()
        p99_miss = not (ratio <= 1.5)
        if p99_miss:
            misses.append(f"victim p99 x{ratio:.2f} > 1.5")
        if end.get("fds") is None or end["fds"] > start["fds"] + FD_TOL:
            misses.append(f"fds {start['fds']} -> {end.get('fds')}")
        rss_max, an_max = samp.max("rss_kb"), samp.max("anon_kb")
        if rss_max and an_max and start.get("anon_kb") and end.get("anon_kb"):
            notes = (f"RSS max {rss_max / 1024:.1f} MiB (anon {start['anon_kb'] / 1024:.1f} -> max "
                     f"{an_max / 1024:.1f} -> {end['anon_kb'] / 1024:.1f} MiB); " + notes)
        if misses:
            notes += f"; MISSED: {', '.join(misses)}"
        r.ok = not misses
        # With --ci a p99 above its goal alone is reported, not fatal (CI machines are shared).
        r.ci_fatal = bool(misses) and not (p99_miss and len(misses) == 1)
        r.lost = lost if lost else (f"{res.failed} victim requests ({res.summary()})" if res.failed else "nothing")
        r.notes = notes
        log(r.line())
        self.rows.append(r)
        return r

    def baseline(self, st):
        log(f"  baseline: victims alone for {self.dur:g} s")
        load = Load(st.port, "/", connections=VICTIMS, tmp=st.tmp, timeout="5s").start(settle=0)
        start = st.stats()
        time.sleep(self.dur)
        res = load.stop()
        self.base = res
        r = Row(GROUP, "baseline (victims alone)", f"victims: wrk -t1 -c{VICTIMS} keep-alive GET /", "none",
                requests=res.requests, failed=res.failed, p50_ms=res.p50_ms, p99_ms=res.p99_ms,
                base_p50_ms=res.p50_ms, base_p99_ms=res.p99_ms, start=start, end=st.stats(),
                goal="0 failed", ok=res.failed == 0 and res.requests > 0,
                lost="nothing" if not res.failed else res.summary(), reproduce=REPRO,
                notes=f"{res.rps:.0f} req/s, p50 {res.p50_ms:.2f} ms", duration_s=self.dur)
        log(r.line())
        self.rows.append(r)

    # -- 1. slowloris

    def slowloris(self, st, n):
        T = self.header_timeout
        head = b"GET / HTTP/1.1\r\nHost: slowloris\r\n"
        every = 1.0

        def fn(st, start, samp):
            socks, t_conn, fails = [], [], 0
            for lo in range(0, n, 200):
                for _ in range(min(200, n - lo)):
                    try:
                        s = nb_socket(st.port)
                        socks.append(s)
                        t_conn.append(time.monotonic())
                    except OSError:
                        fails += 1
                time.sleep(0.02)
            sel = selectors.DefaultSelector()
            info = [{"closed": None, "status": None, "buf": b"", "sent": 0, "lines": 0} for _ in socks]
            for i, s in enumerate(socks):
                sel.register(s, selectors.EVENT_READ, i)
            # connection i: the request line + Host at ~0.05 s, then a line every `every` s,
            # staggered over the connections
            due = [t_conn[i] + 0.05 + every * i / max(1, len(socks)) for i in range(len(socks))]
            phase_end = time.monotonic() + T + 4.0
            open_n = len(socks)
            while open_n and time.monotonic() < phase_end:
                now = time.monotonic()
                for i, s in enumerate(socks):
                    if info[i]["closed"] is None and due[i] <= now:
                        data = head if info[i]["lines"] == 0 else f"X-S-{info[i]['lines']}: b\r\n".encode()
                        try:
                            s.send(data)
                        except BlockingIOError:
                            pass
                        except OSError:
                            pass  # the read side sees the close
                        info[i]["lines"] += 1
                        due[i] += every
                for key, _ in sel.select(0.05):
                    i = key.data
                    try:
                        data = socks[i].recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if data:
                        info[i]["buf"] = (info[i]["buf"] + data)[:64]
                        if info[i]["status"] is None and b"\r\n" in info[i]["buf"]:
                            parts = info[i]["buf"].split(b" ", 2)
                            info[i]["status"] = parts[1].decode("latin-1")[:3] if len(parts) > 1 else "?"
                        continue
                    info[i]["closed"] = time.monotonic() - t_conn[i]
                    sel.unregister(socks[i])
                    open_n -= 1
            rss_max = samp.max("anon_kb") or 0
            still = sum(1 for x in info if x["closed"] is None)
            for s in socks:
                rst(s)
            sel.close()
            times = sorted(x["closed"] for x in info if x["closed"] is not None)
            at_timeout = sum(1 for t in times if T - 0.3 <= t <= T + 2.0)
            got408 = sum(1 for x in info if x["closed"] is not None and x["status"] == "408")
            statuses = tally(x["status"] or "none" for x in info)
            growth = (rss_max - start["anon_kb"]) * KIB / max(1, len(socks))
            ok = len(socks) == n and at_timeout == n
            notes = (f"{len(socks)}/{n} opened ({fails} failed); {len(times)} closed by tqproxy, {at_timeout} within "
                     f"[{T - 0.3:g}, {T + 2:g}] s of connect, {got408} after a 408, {still} still open at "
                     f"{T + 4:g} s; answers {fmt_tally(statuses)}")
            if times:
                notes += (f"; close after min {times[0]:.2f} / median {statistics.median(times):.2f} / "
                          f"max {times[-1]:.2f} s")
            notes += f"; anon RSS max growth {growth:.0f} B per slowloris connection"
            return ok, notes, None

        return self.measure(st, f"{n} slowloris", f"{n} connections, a head line every {every:g} s, "
                            f"client_header_timeout {T:g} s", fn,
                            f"all {n} closed at client_header_timeout ({T:g} s), victims 0 failed, p99 <= 1.5x")

    # -- 2. slow readers

    def slow_readers(self, st, n, secs):
        req = b"GET /bytes/1048576 HTTP/1.1\r\nHost: slow\r\n\r\n"

        def fn(st, start, samp):
            cs = []
            for _ in range(n):
                cs.append(nb_socket(st.port, rcvbuf=4096))
            time.sleep(0.2)
            got = [0] * n
            sent = [False] * n
            closed = 0
            t_end = time.monotonic() + secs
            nxt = time.monotonic()
            while time.monotonic() < t_end:
                for i, s in enumerate(cs):
                    if s is None:
                        continue
                    if not sent[i]:
                        try:
                            s.send(req)
                            sent[i] = True
                        except (BlockingIOError, OSError):
                            pass
                        continue
                    try:
                        d = s.recv(1024)
                        if not d:
                            closed += 1
                            s.close()
                            cs[i] = None
                        got[i] += len(d)
                    except BlockingIOError:
                        pass
                    except OSError:
                        closed += 1
                        s.close()
                        cs[i] = None
                nxt += 1.0
                time.sleep(max(0.0, min(nxt, t_end) - time.monotonic()))
            rss_max = samp.max("anon_kb") or 0
            for s in cs:
                if s is not None:
                    s.close()
            growth = (rss_max - start["anon_kb"]) * KIB / n
            per = statistics.median(got)
            ok = growth <= 128 * KIB and closed == 0 and all(sent)
            notes = (f"{sum(sent)}/{n} asked 1 MiB; each read a median {per / 1024:.1f} KiB in {secs:g} s "
                     f"(max {max(got) / 1024:.1f} KiB); {closed} closed by tqproxy meanwhile; anon RSS max growth "
                     f"{(rss_max - start['anon_kb']) / 1024:.1f} MiB = {growth / 1024:.1f} KiB per slow reader "
                     f"(bound 128 KiB; 1 MiB if it buffered the answer)")
            return ok, notes, None

        return self.measure(st, f"{n} slow readers", f"{n} clients reading /bytes/1048576 at 1 KiB/s for {secs:g} s "
                            "(SO_RCVBUF 4 KiB)", fn,
                            "RSS growth <= 128 KiB per slow reader, none closed, victims 0 failed, p99 <= 1.5x")

    # -- 3. idle keep-alive connections

    def idle(self, st, n):
        req = b"GET / HTTP/1.1\r\nHost: idle\r\n\r\n"

        def fn(st, start, samp):
            before = settle_rss(st.tq.pid)
            t0 = time.monotonic()
            cs = in_batches(st.port, n, req, 200, 30, keep=True)
            t_open = time.monotonic() - t0
            okc = [c for c in cs if c.state == "done" and c.statuses == [200]]
            after = settle_rss(st.tq.pid, 4)
            per = (after - before) * KIB / max(1, len(okc))
            sample = okc[:: max(1, len(okc) // 200)][:200]
            for c in sample:
                c.state, c.out, c.buf, c.statuses = "send", req, b"", []
                try:
                    st_sock = c.sock
                    sel_ok = st_sock.fileno() >= 0
                except OSError:
                    sel_ok = False
                if not sel_ok:
                    c.state = "failed"
            drive([c for c in sample if c.state == "send"], 10)
            answered = sum(1 for c in sample if c.state == "done" and c.statuses == [200])
            for c in cs:
                if c.sock:
                    rst(c.sock)
            fails = tally(c.err for c in cs if c.state != "done")
            ok = len(okc) == n and per <= 4096 and answered == len(sample)
            notes = (f"{len(okc)}/{n} opened and answered in {t_open:.1f} s (failures: {fmt_tally(fails)}); "
                     f"anon RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB settled = {per:.0f} B per idle "
                     f"connection (target 4 096); a second GET on {len(sample)} of them: {answered} answered 200")
            return ok, notes, None

        return self.measure(st, f"{n} idle keep-alive", f"{n} connections, one GET / each, then idle", fn,
                            "<= 4 096 B per idle connection, all answered again, victims 0 failed, p99 <= 1.5x")

    # -- 4. header floods

    def header_floods(self, st, rounds, secs):
        many = ("GET / HTTP/1.1\r\nHost: flood\r\n" + "".join(f"X-H-{i}: {i}\r\n" for i in range(1000))
                + "\r\n").encode()
        huge = ("GET / HTTP/1.1\r\nHost: flood\r\nX-Huge: " + "h" * 70000 + "\r\n\r\n").encode()
        per = 25  # of each kind per round: 50 flooders at once

        def fn(st, start, samp):
            res = {"1 000 headers": [], "a 70 000-byte header": []}
            anon = []
            t_end = time.monotonic() + secs
            r = 0
            while r < rounds and time.monotonic() < t_end:
                cs = []
                for label, data in (("1 000 headers", many), ("a 70 000-byte header", huge)):
                    for _ in range(per):
                        cs.append(C(nb_socket(st.port), data, want=1, eof=True))
                drive(cs, 10)
                for i, c in enumerate(cs):
                    rst(c.sock)
                    res["1 000 headers" if i < per else "a 70 000-byte header"].append(c)
                anon.append(anon_kb(st.tq.pid))
                r += 1
            rss_max = samp.max("anon_kb") or 0
            parts, ok = [], True
            for label, cs in res.items():
                answers = tally(c.statuses[0] if c.statuses else "none" for c in cs)
                good = sum(1 for c in cs if c.statuses[:1] in ([431], [400]) and len(c.statuses) == 1 and c.closed)
                ok = ok and good == len(cs)
                parts.append(f"{label}: {good}/{len(cs)} got 431/400 then EOF (answers {fmt_tally(answers)})")
            growth = (rss_max - start["anon_kb"]) * KIB / (2 * per)
            q = max(1, len(anon) // 4)
            # a leak grows with the rounds; a bound does not: the last quarter's anon RSS against the first's
            first, last = max(anon[:q]), max(anon[-q:])
            leak = last > first + max(2048, 0.2 * first)
            ok = ok and not leak and r >= 2
            notes = ("; ".join(parts) + f"; {r} rounds of {2 * per} at once; anon RSS max growth {growth / 1024:.1f} "
                     f"KiB per concurrent flooder; anon RSS after the first quarter of the rounds {first / 1024:.1f} "
                     f"MiB, after the last {last / 1024:.1f} MiB ({'grows: a leak?' if leak else 'bounded'})")
            return ok, notes, None

        return self.measure(st, "header floods", f"rounds of {per} x 1 000 headers + {per} x one 70 000-byte header "
                            f"at once, up to {rounds} rounds / {secs:g} s", fn,
                            "each 431 (or 400) then closed, memory not growing with the rounds, victims 0 failed, "
                            "p99 <= 1.5x")

    # -- 5. pipelining floods

    def pipelining(self, st, nconn, nreq, size, hold, drain):
        # padded to 256 bytes; the answers (`size` bytes each, nreq x size > the 4 MiB tcp_wmem max)
        # cannot all sit in tqproxy's socket send buffer, so its write side blocks
        one = b"GET /bytes/%d HTTP/1.1\r\nHost: pipe\r\nX-Pad: " % size
        one += b"p" * (252 - len(one)) + b"\r\n\r\n"
        assert len(one) == 256
        marker = b"HTTP/1.1 "

        def fn(st, start, samp):
            cs = [nb_socket(st.port, rcvbuf=4096) for _ in range(nconn)]
            out = [one * nreq for _ in range(nconn)]
            sent = [0] * nconn
            time.sleep(0.2)
            t_end = time.monotonic() + hold
            while time.monotonic() < t_end:
                progressed = False
                for i, s in enumerate(cs):
                    if sent[i] < len(out[i]):
                        try:
                            k = s.send(out[i][sent[i]:sent[i] + 65536])
                            sent[i] += k
                            progressed = progressed or k > 0
                        except (BlockingIOError, OSError):
                            pass
                if not progressed:
                    time.sleep(0.1)
            rss_hold = samp.max("anon_kb") or 0
            sent_hold = sum(sent)
            # what tqproxy has not read: still in the client's program, in its socket's send queue,
            # or in tqproxy's receive queue; stopped = more than 64 KiB of that (its read window is 16)
            qs = tcp_queues(st.port)
            unread = []
            for i, s in enumerate(cs):
                cp = s.getsockname()[1]
                unread.append(len(out[i]) - sent[i] + qs.get((cp, st.port), (0, 0))[0]
                              + qs.get((st.port, cp), (0, 0))[1])
            stopped = sum(1 for u in unread if u > 64 * KIB)
            fully_sent_hold = sum(1 for i in range(nconn) if sent[i] == len(out[i]))
            # now read: every connection must be answered in full, or closed by tqproxy
            got = [0] * nconn
            carry = [b""] * nconn
            closed = [False] * nconn
            sel = selectors.DefaultSelector()
            for i, s in enumerate(cs):
                sel.register(s, selectors.EVENT_READ, i)
            t_end = time.monotonic() + drain
            while time.monotonic() < t_end:
                if all(closed[i] or got[i] >= nreq for i in range(nconn)):
                    break
                for i, s in enumerate(cs):
                    if not closed[i] and sent[i] < len(out[i]):
                        try:
                            sent[i] += s.send(out[i][sent[i]:sent[i] + 65536])
                        except (BlockingIOError, OSError):
                            pass
                for key, _ in sel.select(0.05):
                    i = key.data
                    try:
                        d = cs[i].recv(262144)
                    except BlockingIOError:
                        continue
                    except OSError:
                        d = b""
                    if not d:
                        closed[i] = True
                        sel.unregister(cs[i])
                        continue
                    d = carry[i] + d
                    got[i] += d.count(marker)
                    carry[i] = d[-(len(marker) - 1):]
            t_drain = drain - max(0.0, t_end - time.monotonic())
            sel.close()
            rss_max = samp.max("anon_kb") or 0
            for s in cs:
                rst(s)
            answered = sum(1 for i in range(nconn) if got[i] >= nreq)
            closed_n = sum(1 for i in range(nconn) if closed[i] and got[i] < nreq)
            neither = nconn - answered - closed_n
            per = (rss_hold - start["anon_kb"]) * KIB / nconn
            ok = neither == 0 and per <= 256 * KIB and stopped == nconn
            notes = (f"while not reading ({hold:g} s): {sent_hold / nconn / 1024:.0f} KiB written per connection "
                     f"of {len(out[0]) / 1024:.0f} KiB ({fully_sent_hold}/{nconn} wrote all); not read by tqproxy (the "
                     f"rest + the client's send queue + tqproxy's receive queue): a median "
                     f"{statistics.median(unread) / 1024:.0f} KiB per connection, {stopped}/{nconn} connections "
                     f"with > 64 KiB unread (tqproxy stopped reading); anon RSS growth "
                     f"{per / 1024:.1f} KiB per connection; then reading ({t_drain:.1f} s): {answered} answered in "
                     f"full ({sum(got)} responses), {closed_n} closed by tqproxy, {neither} neither")
            return ok, notes, None

        return self.measure(st, "pipelining flood", f"{nconn} connections x {nreq} pipelined GET /bytes/{size} "
                            f"(SO_RCVBUF 4 KiB), not read for {hold:g} s, then read", fn,
                            "bounded buffering (<= 256 KiB per connection), every connection answered or closed, "
                            "victims 0 failed, p99 <= 1.5x")

    # -- 6. connection flood beyond max_connections (own stack)

    def conn_flood(self, st, n):
        req = b"GET / HTTP/1.1\r\nHost: flood\r\n\r\n"

        def fn(st, start, samp):
            time.sleep(0.3)  # the victims' connections are in (opened by Load.start)
            cs = in_batches(st.port, n, req, 200, 10, keep=True)
            # the 503 ones must then be closed by tqproxy: wait for EOF on them
            over = [c for c in cs if c.statuses == [503]]
            for c in over:
                c.state, c.eof, c.want, c.statuses = "read", True, 0, []
            sel = selectors.DefaultSelector()
            for c in over:
                sel.register(c.sock, selectors.EVENT_READ, c)
            left, deadline = len(over), time.monotonic() + 5
            eof = 0
            while left and time.monotonic() < deadline:
                for key, _ in sel.select(0.2):
                    c = key.data
                    try:
                        d = c.sock.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        d = b""
                    if not d:
                        eof += 1
                        left -= 1
                        sel.unregister(c.sock)
            sel.close()
            answers = tally(c.statuses[0] if c.statuses else (503 if c in over else (c.err or "none")) for c in cs)
            n200 = sum(1 for c in cs if c.statuses == [200])
            for c in cs:
                if c.sock:
                    rst(c.sock)
            time.sleep(0.5)
            after = []
            for _ in range(20):
                try:
                    after.append(common.http_get(st.port, "/", timeout=5)[0])
                except OSError as e:
                    after.append(str(e))
            ok_after = sum(1 for s in after if s == 200)
            expect_200 = FLOOD_MAX - VICTIMS
            ok = (len(over) == n - expect_200 and n200 == expect_200 and eof == len(over) and ok_after == 20)
            notes = (f"max_connections {FLOOD_MAX}, {VICTIMS} victims connected first: of {n}, {n200} got 200 "
                     f"(expected {expect_200}), {len(over)} got 503 (expected {n - expect_200}), {eof} of those "
                     f"closed by tqproxy; answers {fmt_tally(answers)}; after the flood {ok_after}/20 new "
                     f"connections got 200")
            return ok, notes, None

        return self.measure(st, f"connection flood ({n} > max_connections {FLOOD_MAX})",
                            f"{n} connections, one GET / each, kept open", fn,
                            "beyond the limit 503 + close, served again after, victims 0 failed, p99 <= 1.5x")

    # -- 7. resets mid-request and mid-response

    def resets(self, st, n):
        half_head = b"GET / HTTP/1.1\r\nHost: reset\r\nX-Half: "
        half_body = b"POST /echo HTTP/1.1\r\nHost: reset\r\nContent-Length: 1000\r\n\r\n" + b"x" * 500
        big = b"GET /bytes/1048576 HTTP/1.1\r\nHost: reset\r\n\r\n"

        def fn(st, start, samp):
            rss0 = settle_rss(st.tq.pid, 2)
            anon = []
            t_stop = time.monotonic() + (60 if not self.quick else 20)
            counts = {"half head": 0, "half body": 0, "mid-response": 0}
            short = 0
            batch = 50
            i = 0
            while i < n and time.monotonic() < t_stop:
                k = min(batch, n - i)
                # mid-request: half of them half a head, half of them half a body
                socks = []
                for j in range(k):
                    s = socket.create_connection(("127.0.0.1", st.port), timeout=5)
                    data = half_head if j % 2 == 0 else half_body
                    s.sendall(data)
                    socks.append(s)
                    counts["half head" if j % 2 == 0 else "half body"] += 1
                time.sleep(0.03)
                for s in socks:
                    rst(s)
                # mid-response: read 4 KiB of 1 MiB, then RST
                socks = []
                for j in range(k):
                    s = socket.create_connection(("127.0.0.1", st.port), timeout=5)
                    s.sendall(big)
                    socks.append(s)
                for s in socks:
                    got = 0
                    try:
                        while got < 4096:
                            d = s.recv(4096 - got)
                            if not d:
                                break
                            got += len(d)
                    except OSError:
                        pass
                    if got < 4096:
                        short += 1
                    counts["mid-response"] += 1
                    rst(s)
                i += k
                anon.append(anon_kb(st.tq.pid))
            # nothing kept (in-flight is checked once the victims stopped: see `after`)
            st.wait(lambda: (st.stats().get("fds") or 1 << 30) <= start["fds"] + FD_TOL, 10, step=0.25)
            rss1 = settle_rss(st.tq.pid, 4)
            # a leak grows with the batches; mimalloc keeps what it took (in 2 MiB steps): the last
            # quarter of the batches against the first
            qn = max(1, len(anon) // 4)
            first, last = max(anon[:qn]), max(anon[-qn:])
            leak = last > first + max(2048, 0.2 * first)
            ok = not leak and len(anon) >= 4 and short == 0 and sum(counts.values()) == 2 * n
            notes = (f"{fmt_tally(counts)} reset in {len(anon)} batches ({short} mid-response ones got < 4 KiB "
                     f"first); anon RSS settled {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB, after the first quarter "
                     f"of the batches {first / 1024:.1f} MiB, after the last {last / 1024:.1f} MiB "
                     f"({'grows: a leak?' if leak else 'not growing'})")
            return ok, notes, None

        def after(st):
            zero = st.wait(lambda: in_flight(st) == 0, 5, step=0.2)
            return zero, f"in-flight in /status.json once the victims stopped: {in_flight(st)}"

        return self.measure(st, "resets mid-request / mid-response",
                            f"{n} resets mid-request (half head / half body) + {n} mid-response (4 KiB of 1 MiB), "
                            "RST via SO_LINGER 0, 50 at a time", fn,
                            "in-flight 0, fds and RSS back, victims 0 failed, p99 <= 1.5x", after=after)

    # -- 8. the smuggling corpus

    def smuggling(self, st, rawlog):
        corpus = smuggling_corpus()

        def fn(st, start, samp):
            bad = []
            answers = {}
            for k, (name, data, codes, kind) in enumerate(corpus):
                tail = f"GET /__smuggled-{k} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode()
                want = 2 if kind == "pipelined" else 1
                c = C(nb_socket(st.port), data + tail, want=want, eof=True)
                drive([c], 5)
                if c.sock:
                    c.sock.close()
                got = c.statuses
                answers[tuple(got)] = answers.get(tuple(got), 0) + 1
                good = (got == codes) if kind == "pipelined" else (len(got) == 1 and got[0] in codes)
                if not good or not c.closed:
                    bad.append(f"{name.split()[0]}: got {got}{'' if c.closed else ' and no EOF'}, want {codes}")
            # a sentinel through the same worker: what was forwarded before it is in the log
            sent_ok = False
            try:
                s, _ = common.http_get(st.port, "/__sentinel", host="a.test")
                sent_ok = s == 200
            except OSError:
                pass
            recs = read_rawecho_log(rawlog)
            smuggled = [r for r in recs if b"smuggled" in r[2].lower()]
            reqs = [r for r in recs if r[1] == "req"]
            allowed_req = [r for r in reqs if r[2].startswith(b"GET /__sentinel") or r[2].startswith(b"GET /ok ")]
            stray = [r for r in reqs if r not in allowed_req]
            partial = [r for r in recs if r[1] in ("eof", "bad")]
            partial_bad = [r for r in partial if not r[2].startswith(b"POST /c HTTP/1.1")]
            ok = not bad and sent_ok and not smuggled and not stray and not partial_bad
            notes = (f"{len(corpus)} rejected cases from conformance.rs replayed, each + a pipelined GET: "
                     f"{len(corpus) - len(bad)} answered as expected then closed; answers "
                     f"{fmt_tally({' '.join(map(str, k)) or 'none': v for k, v in answers.items()})}; rawecho saw "
                     f"{len(reqs)} requests ({len(allowed_req)} expected: sentinel, s65's first), "
                     f"{len(smuggled)} smuggled, {len(partial)} partial bad-chunked heads "
                     f"({len(partial_bad)} unexpected)")
            if bad:
                notes += "; wrong: " + "; ".join(bad[:8])
            return ok, notes, (f"{len(bad)} wrong answers" if bad else None)

        return self.measure(st, "request-smuggling corpus", f"{len(corpus)} rejected requests of "
                            "tests/it/conformance.rs + a smuggled GET after each", fn,
                            "each gets its 4xx/5xx and EOF, the worker sees no smuggled request, victims 0 failed")

    # -- the whole group

    def stack(self, name, proxy, workers):
        # ports=32: a block of 200 can be hard to find in 33000-60000 (the ephemeral range) after a
        # scenario leaves thousands of tqproxy's upstream connections in TIME_WAIT
        st = Stack(name, {}, proxy=proxy, keep=self.ctx.keep, ports=32)
        st.rawlog = os.path.join(st.tmp, "rawecho.log")
        if callable(workers):
            workers = workers(st)
        for w, text in workers.items():
            st.write_worker(w, text)
        try:
            st.start(ready={w: int(re.search(r"instances: (\d+)", t).group(1)) for w, t in workers.items()})
            common.Load(st.port, "/", connections=VICTIMS, tmp=st.tmp).start(settle=1.0).stop()  # warm-up
        except Exception:
            st.stop()
            st.cleanup()
            raise
        return st

    def finish(self, st, rows):
        st.stop()
        leaks = st.leaks()
        st.cleanup()
        if leaks:
            log(f"  LEAKS after stop: {leaks}")
            for r in rows:
                r.ok = False
                r.ci_fatal = True
                r.notes += f"; the stack left behind after stop: {', '.join(leaks)}"

    def run(self, only=None):
        """Each scenario on a fresh stack of the same configuration (so that each memory figure
        starts from a process that has not just freed another scenario's memory); the baseline
        on the first one."""
        want = lambda k: only is None or k in only  # noqa: E731
        q, ci = self.quick, self.ci
        hard = raise_nofile(40000)
        if hard < 12000 + 1024:
            log(f"  RLIMIT_NOFILE is {hard}: fewer idle connections fit")
        T = self.header_timeout
        # --config-header-timeout: what tqproxy is given, when it should differ from what is checked
        # (to see the slowloris check fail when tqproxy does not close in time)
        Tc = getattr(self.ctx, "config_header_timeout", None) or T
        proxy = (f"client_header_timeout: {Tc:g}s, client_keepalive_timeout: 300s, client_body_timeout: 30s, "
                 f"upstream_idle_timeout: 2s, max_connections: {MAX_CONNS}")
        n_hello = 1 if ci else 3
        log(f"  each stack: tqproxy ({proxy}), hello x{n_hello} on /, rawecho on a.test/")
        plan = [(1, lambda st: self.slowloris(st, 100 if ci else 1000))]
        if not ci:
            plan += [
                (2, lambda st: self.slow_readers(st, 200, 5 if q else 20)),
                (3, lambda st: self.idle(st, 2000 if q else min(10000, hard - 2048))),
                (4, lambda st: self.header_floods(st, 40 if q else 200, 3 if q else 10)),
                (5, lambda st: self.pipelining(st, 20 if q else 50, 2000 if q else 10000, 4096 if q else 1024,
                                               2 if q else 8, 20 if q else 90)),
                (8, lambda st: self.smuggling(st, st.rawlog)),
                (7, lambda st: self.resets(st, 300 if q else 2000)),
            ]
        for k, fn in plan:
            if not (ci or want(k)):
                continue
            st = self.stack(f"clients-{k}", proxy, lambda st: {
                "hello": worker_yaml(BACKEND, instances=n_hello),
                "rawecho": worker_yaml(RAWECHO, routes=("a.test/",), health=None, env={"RAWECHO_LOG": st.rawlog}),
            })
            n0 = len(self.rows)
            try:
                if self.base is None:
                    self.baseline(st)
                fn(st)
            finally:
                self.finish(st, self.rows[n0:])
        if not ci and want(6):
            proxy_b = (f"client_header_timeout: {T:g}s, client_keepalive_timeout: 300s, upstream_idle_timeout: 2s, "
                       f"max_connections: {FLOOD_MAX}")
            log(f"  flood stack: tqproxy ({proxy_b}), hello x2")
            sb = self.stack("clients-flood", proxy_b, {"hello": worker_yaml(BACKEND, instances=2)})
            n0 = len(self.rows)
            try:
                saved = self.base
                self.baseline(sb)
                self.conn_flood(sb, 500 if q else 2000)
                self.base = saved
            finally:
                self.finish(sb, self.rows[n0:])
        return self.rows


def run(ctx):
    return Group(ctx).run(getattr(ctx, "only", None))


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="load-tests/reliability group 4: abusive clients")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ci", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", help="comma-separated scenario numbers (1-8)")
    ap.add_argument("--header-timeout", type=float, help="tqproxy's client_header_timeout, seconds")
    ap.add_argument("--config-header-timeout", type=float,
                    help="give tqproxy this client_header_timeout instead, still checking --header-timeout's")
    a = ap.parse_args()
    ctx = common.Ctx(quick=a.quick or a.ci, keep=a.keep)
    ctx.ci = a.ci
    ctx.header_timeout = a.header_timeout
    ctx.config_header_timeout = a.config_header_timeout
    ctx.only = {int(x) for x in a.only.split(",")} if a.only else None
    common.ensure_tools("wrk")
    t0 = time.monotonic()
    rows = run(ctx)
    log(f"\n{GROUP}: {len(rows)} rows in {time.monotonic() - t0:.0f} s")
    for r in rows:
        print(r.line())
    sys.exit(0 if all(r.ok for r in rows) else 1)
