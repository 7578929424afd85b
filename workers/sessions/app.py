#!/usr/bin/env python3
"""sessions — login sessions kept in Redis, not in the process (python3 standard library only).

Every deploy, rollback, recycle and crash replaces this worker's processes; what a process holds
in memory goes with it. The sessions live in the redis worker instead (workers/redis), which
tqproxy leaves running across all of that, so a logged-in user stays logged in (README,
"External state").

    POST /login     body `user=NAME` (form-encoded): stores session:<id> -> NAME in Redis for
                    SESSION_TTL seconds (default 86400), sets the cookie `sid=<id>`; 200
                    {"user": NAME}
    GET /me         with the cookie: 200 {"user": NAME, "instance": ..., "generation": ...};
                    401 without a (live) session; 503 when Redis cannot be reached
    POST /logout    deletes the session; 200
    GET /health     ok (the process answers; Redis is not asked)
    GET /version    $SESSIONS_VERSION or 1

Redis's address is TQ_SERVICE_REDIS (`127.0.0.1:6390`), which tqproxy sets for every worker
from the redis worker's fixed `port`. RESP is spoken by hand over one connection per thread,
opened again after any error.

Listens on 127.0.0.1:$PORT, or on the inherited fd 3 when LISTEN_FDS=1 and LISTEN_PID is this
process. SIGTERM: stop accepting and exit 0 (tqproxy has drained the instance before it
signals it).
"""

import json
import os
import secrets
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

MAX_BODY = 4096
USER_MAX = 64


def log(msg):
    sys.stderr.write(f"sessions: {msg}\n")
    sys.stderr.flush()


def env(name, default):
    value = os.environ.get(name, "")
    return "".join(c for c in value if c.isprintable()) or default


INSTANCE = env("WORKER_INSTANCE", "0")
GENERATION = env("WORKER_GENERATION", "0")
VERSION = env("SESSIONS_VERSION", "1")
TTL = int(env("SESSION_TTL", "86400"))
REDIS = env("TQ_SERVICE_REDIS", "127.0.0.1:6379")


class RedisError(Exception):
    pass


class Redis:
    """A minimal RESP2 client: one connection, commands as arrays of bulk strings."""

    def __init__(self, addr, timeout=2.0):
        host, _, port = addr.rpartition(":")
        self.addr = (host or "127.0.0.1", int(port))
        self.timeout = timeout
        self.sock = None
        self.rfile = None

    def _connect(self):
        self.sock = socket.create_connection(self.addr, timeout=self.timeout)
        self.rfile = self.sock.makefile("rb")

    def close(self):
        for f in (self.rfile, self.sock):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self.sock = self.rfile = None

    def command(self, *args):
        """Sends one command and returns its reply; reconnects once if the connection broke
        (Redis restarted, or idled us out) before anything was read."""
        for attempt in (0, 1):
            try:
                if self.sock is None:
                    self._connect()
                self.sock.sendall(self._encode(args))
                return self._reply()
            except (OSError, RedisError) as e:
                self.close()
                if attempt == 1 or isinstance(e, RedisError):
                    raise RedisError(f"redis {self.addr[0]}:{self.addr[1]}: {e}") from e

    @staticmethod
    def _encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    def _line(self):
        line = self.rfile.readline(65536)
        if not line.endswith(b"\r\n"):
            raise OSError("connection closed")
        return line[:-2]

    def _reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.rfile.read(n + 2)
            if len(data) != n + 2:
                raise OSError("connection closed")
            return data[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply() for _ in range(n)]
        raise RedisError(f"unexpected reply {line[:40]!r}")


local = threading.local()


def redis():
    if getattr(local, "redis", None) is None:
        local.redis = Redis(REDIS)
    return local.redis


def session_id(cookie_header):
    for part in (cookie_header or "").split(";"):
        k, _, v = part.strip().partition("=")
        if k == "sid" and v and len(v) <= 64 and all(c.isalnum() or c in "-_" for c in v):
            return v
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sessions"

    def log_message(self, fmt, *args):
        pass

    def send(self, status, body, headers=()):
        data = (json.dumps(body) + "\n").encode() if not isinstance(body, bytes) else body
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Instance", INSTANCE)
        self.send_header("X-Generation", GENERATION)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n < 0 or n > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(n)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            return self.send(200, b"ok\n")
        if path == "/version":
            return self.send(200, (VERSION + "\n").encode())
        if path == "/me":
            sid = session_id(self.headers.get("Cookie"))
            if sid is None:
                return self.send(401, {"error": "not logged in"})
            try:
                user = redis().command("GET", f"session:{sid}")
            except RedisError as e:
                log(str(e))
                return self.send(503, {"error": "session store unavailable"})
            if user is None:
                return self.send(401, {"error": "no such session"})
            return self.send(
                200,
                {"user": user.decode(errors="replace"), "instance": INSTANCE, "generation": GENERATION},
            )
        self.send(404, {"error": "not found"})

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        try:
            form = parse_qs(self.body().decode(errors="replace"))
        except ValueError as e:
            return self.send(413, {"error": str(e)})
        try:
            if path == "/login":
                user = (form.get("user") or [""])[0]
                if not user or len(user) > USER_MAX or not user.isprintable():
                    return self.send(400, {"error": f"user=NAME, 1-{USER_MAX} printable characters"})
                sid = secrets.token_urlsafe(24)
                redis().command("SET", f"session:{sid}", user, "EX", TTL)
                cookie = f"sid={sid}; Path=/; HttpOnly; SameSite=Lax; Max-Age={TTL}"
                return self.send(200, {"user": user}, [("Set-Cookie", cookie)])
            if path == "/logout":
                sid = session_id(self.headers.get("Cookie"))
                if sid is not None:
                    redis().command("DEL", f"session:{sid}")
                return self.send(200, {"logged_out": True}, [("Set-Cookie", "sid=; Path=/; Max-Age=0")])
        except RedisError as e:
            log(str(e))
            return self.send(503, {"error": "session store unavailable"})
        self.send(404, {"error": "not found"})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False


def listener():
    if os.environ.get("LISTEN_FDS") == "1" and os.environ.get("LISTEN_PID") == str(os.getpid()):
        return socket.socket(fileno=3)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(os.environ.get("PORT", "8000"))))
    s.listen(1024)
    return s


def main():
    server = Server(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = listener()
    server.server_address = server.socket.getsockname()

    def stop(signum, _frame):
        # shutdown() waits for serve_forever to return: call it off the main thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log(f"instance {INSTANCE} generation {GENERATION} on {server.server_address}, redis at {REDIS}")
    server.serve_forever(poll_interval=0.2)
    server.server_close()


if __name__ == "__main__":
    main()
