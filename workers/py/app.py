#!/usr/bin/env python3
"""py — tqproxy's example worker in another language (python3 standard library only).

Follows the worker contract (DESIGN.md, "Worker contract"):

- listens on 127.0.0.1:$PORT, or on the inherited fd 3 when LISTEN_FDS=1 and LISTEN_PID is
  this process (socket passing into a network namespace);
- SIGTERM (or SIGINT) is graceful: stop accepting, let in-flight requests finish, close idle
  keep-alive connections, exit 0; a second signal exits at once;
- HTTP/1.1 keep-alive, Content-Length on every response, Content-Length and chunked request
  bodies, X-Worker / X-Instance / X-Generation on every response.

Endpoints (each also under a /py prefix, for routes whose prefix the proxy does not strip):

    GET /health          ok
    GET /version         $PY_VERSION or 1
    GET /slow?ms=N       "slow done" after N ms (at most 600000)
    POST|PUT /echo       the request body, same content type
    anything else        hello from python worker <name> instance <id> generation <gen> (pid <pid>) path=<path>

PY_ACCESS_LOG=1 logs one compact line per request to stderr (off by default).
Run as `python3 app.py` from any directory.
"""

import os
import select
import signal
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PROG = "py"
MAX_BODY = 64 << 20
MAX_SLOW_MS = 600_000
MAX_LINE = 8192


def log(msg):
    sys.stderr.write(f"{PROG}: {msg}\n")
    sys.stderr.flush()


def env(name, default):
    value = os.environ.get(name, "")
    # Values end up in response headers: keep them to one printable line.
    return "".join(c for c in value if c.isprintable()) or default


NAME = env("WORKER_NAME", PROG)
INSTANCE = env("WORKER_INSTANCE", "0")
GENERATION = env("WORKER_GENERATION", "0")
VERSION = env("PY_VERSION", "1")
ACCESS_LOG = os.environ.get("PY_ACCESS_LOG") == "1"


class Shutdown:
    """Shared between the signal handler and the handler threads."""

    lock = threading.Lock()
    stopping = False
    signal_name = None
    # Handlers currently waiting for the next request on a keep-alive connection.
    idle = set()


class BadRequest(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def read_chunked(rfile, keep):
    """Reads a chunked body from rfile; returns it (or b"" when not kept)."""
    out = bytearray()
    while True:
        line = rfile.readline(MAX_LINE)
        if not line.endswith(b"\r\n"):
            raise BadRequest(400, "bad chunk size line")
        size = line[:-2].split(b";", 1)[0].strip()
        if not size or len(size) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size):
            raise BadRequest(400, "bad chunk size")
        size = int(size, 16)
        if size == 0:
            break
        while size > 0:
            data = rfile.read(min(size, 1 << 20))
            if not data:
                raise BadRequest(400, "truncated chunk")
            size -= len(data)
            if keep:
                if len(out) + len(data) > MAX_BODY:
                    raise BadRequest(413, "body too large")
                out += data
        if rfile.read(2) != b"\r\n":
            raise BadRequest(400, "chunk not followed by CRLF")
    while True:  # trailers, then the empty line
        line = rfile.readline(MAX_LINE)
        if line == b"\r\n":
            return bytes(out)
        if not line.endswith(b"\r\n"):
            raise BadRequest(400, "bad trailer")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tqproxy-py"
    # Errors for unparseable request lines get a status line and headers (not HTTP/0.9 style).
    default_request_version = "HTTP/1.0"
    # Idle keep-alive connections and stalled clients are dropped after this many seconds.
    timeout = 75
    # Buffered writes: a response's head and body leave in one send (flushed per request).
    wbufsize = 1 << 16

    # -- connection handling ---------------------------------------------------------------

    def wait_for_request_line(self):
        """Reads the next request line; an idle connection can be closed by the shutdown."""
        with Shutdown.lock:
            if Shutdown.stopping:
                # Serve a request that already arrived, else close.
                readable, _, _ = select.select([self.connection], [], [], 0)
                if not readable:
                    self.close_connection = True
                    return b""
            else:
                Shutdown.idle.add(self)
        try:
            return self.rfile.readline(65537)
        finally:
            with Shutdown.lock:
                Shutdown.idle.discard(self)

    def handle_one_request(self):
        # BaseHTTPRequestHandler.handle_one_request, with the idle wait made interruptible.
        try:
            self.raw_requestline = self.wait_for_request_line()
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(414)
            elif not self.raw_requestline:
                self.close_connection = True
            elif self.parse_request():
                self.dispatch()
            self.wfile.flush()
        except (TimeoutError, ConnectionError):
            self.close_connection = True

    def handle_expect_100(self):
        ok = super().handle_expect_100()
        self.wfile.flush()  # the client waits for the 100 before it sends the body
        return ok

    def send_response(self, code, message=None):
        # Every response, error pages included, says who answered.
        super().send_response(code, message)
        self.send_header("X-Worker", NAME)
        self.send_header("X-Instance", INSTANCE)
        self.send_header("X-Generation", GENERATION)

    def log_message(self, format, *args):
        log(f"{self.address_string()} {format % args}")

    def log_request(self, code="-", size="-"):
        if ACCESS_LOG:
            log(f'{self.address_string()} "{self.requestline}" {code}')

    # -- requests --------------------------------------------------------------------------

    def read_body(self, keep):
        te = self.headers.get_all("Transfer-Encoding") or []
        lengths = self.headers.get_all("Content-Length") or []
        if te and lengths:
            raise BadRequest(400, "both Transfer-Encoding and Content-Length")
        if te:
            codings = [c.strip().lower() for c in ",".join(te).split(",") if c.strip()]
            if not codings or codings[-1] != "chunked":
                raise BadRequest(501, "unsupported transfer coding")
            return read_chunked(self.rfile, keep)
        values = {v.strip() for v in lengths}
        if not values:
            return b""
        if len(values) > 1 or not all(v.isdigit() for v in values):
            raise BadRequest(400, "bad Content-Length")
        length = int(values.pop())
        if keep and length > MAX_BODY:
            raise BadRequest(413, "body too large")
        body = bytearray()
        while length > 0:
            data = self.rfile.read(min(length, 1 << 20))
            if not data:
                raise BadRequest(400, "truncated body")
            length -= len(data)
            if keep:
                body += data
        return bytes(body)

    def reply(self, status, body, content_type="text/plain", extra=()):
        if isinstance(body, str):
            body = body.encode()
        if Shutdown.stopping:
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        elif self.request_version == "HTTP/1.0":
            self.send_header("Connection", "keep-alive")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def dispatch(self):
        url = urlsplit(self.path)
        path = url.path
        if path == "/py" or path.startswith("/py/"):
            path = path[3:] or "/"
        is_echo = path == "/echo" and self.command in ("POST", "PUT")
        try:
            if self.headers.defects:  # e.g. a header line without a colon
                raise BadRequest(400, "malformed header section")
            body = self.read_body(keep=is_echo)
        except BadRequest as e:
            self.close_connection = True
            self.reply(e.status, f"{e}\n")
            return
        if path == "/health":
            self.reply(200, "ok\n")
        elif path == "/version":
            self.reply(200, f"{VERSION}\n")
        elif is_echo:
            content_type = self.headers.get("Content-Type", "application/octet-stream")
            self.reply(200, body, content_type)
        elif path == "/echo":
            self.reply(405, "method not allowed\n", extra=[("Allow", "POST, PUT")])
        elif path == "/slow":
            try:
                ms = int(parse_qs(url.query).get("ms", ["0"])[0])
                if not 0 <= ms <= MAX_SLOW_MS:
                    raise ValueError
            except ValueError:
                self.reply(400, "ms must be a number <= 600000\n")
                return
            time.sleep(ms / 1000)
            self.reply(200, "slow done\n")
        else:
            self.reply(
                200,
                f"hello from python worker {NAME} instance {INSTANCE} generation {GENERATION}"
                f" (pid {os.getpid()}) path={self.path}\n",
            )


class Server(ThreadingHTTPServer):
    # Handler threads are joined by server_close(): that is how in-flight requests finish.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    request_queue_size = 1024

    def server_bind(self):
        # HTTPServer.server_bind would call getfqdn(), a DNS lookup: not in a sandbox.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        log(f"{client_address[0]}:{client_address[1]}: {sys.exc_info()[1]!r}")


def inherited_socket():
    """fd 3 when tqproxy passed a listening socket (LISTEN_FDS=1, LISTEN_PID = our pid)."""
    if os.environ.get("LISTEN_FDS", "").strip() != "1":
        return None
    if os.environ.get("LISTEN_PID", "").strip() != str(os.getpid()):
        return None
    try:
        sock = socket.socket(fileno=3)
    except OSError as e:
        log(f"LISTEN_FDS=1 but fd 3 is not a socket: {e}")
        return None
    # Children must not inherit the listening socket.
    sock.set_inheritable(False)
    return sock


def make_server(port):
    sock = inherited_socket()
    if sock is None:
        return Server(("127.0.0.1", port), Handler), ""
    server = Server(sock.getsockname(), Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_address = sock.getsockname()
    server.server_name, server.server_port = server.server_address[:2]
    return server, " (fd 3)"


def main():
    port = os.environ.get("PORT", "").strip()
    if not port:
        log("PORT is not set")
        sys.exit(2)
    if not port.isdigit() or not 0 < int(port) < 65536:
        log(f"PORT={port!r} is not a port number")
        sys.exit(2)
    try:
        server, how = make_server(int(port))
    except OSError as e:
        log(f"cannot listen on 127.0.0.1:{port}: {e}")
        sys.exit(1)

    def on_signal(signum, _frame):
        name = signal.Signals(signum).name
        if Shutdown.stopping:
            log(f"second signal ({name}), exiting now")
            os._exit(128 + signum)
        with Shutdown.lock:
            Shutdown.stopping = True
            idle = list(Shutdown.idle)
        for handler in idle:
            try:
                handler.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        Shutdown.signal_name = name
        # shutdown() waits for serve_forever() to return: not from this (its) thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host, bound_port = server.server_address[:2]
    log(f"instance {INSTANCE} gen {GENERATION} listening on {host}:{bound_port}{how} (pid {os.getpid()})")
    server.serve_forever(poll_interval=0.5)
    server.server_close()  # stops listening, then joins every handler thread
    log(
        f"instance {INSTANCE} gen {GENERATION} exiting after {Shutdown.signal_name}:"
        f" all requests finished (pid {os.getpid()})"
    )
    sys.exit(0)


if __name__ == "__main__":
    main()
