#!/usr/bin/env python3
"""pynotify — `ready: notify` from Python's standard library: the sd_notify protocol is one
datagram to the path in $NOTIFY_SOCKET, so no library is needed (python-systemd's
`daemon.notify("READY=1")` or the `sdnotify` package do the same).

- binds 127.0.0.1:$PORT, then sends READY=1 (tqproxy routes it at once, no health poll);
- sends STATUS=... lines (shown by `tqproxy status`);
- with `watchdog:` in worker.yaml, tqproxy sets WATCHDOG_USEC: a thread sends WATCHDOG=1 at
  half of it (PYNOTIFY_HANG=1 stops the pings, to see tqproxy replace a hung instance);
- on SIGTERM sends STOPPING=1, finishes the request in flight and exits 0.

GET / answers `hello from pynotify instance <id> (pid <pid>)`.
"""

import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer


def notify(state):
    """One sd_notify datagram; a no-op without NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]  # the abstract namespace
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), path)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    served = 0

    def do_GET(self):
        Handler.served += 1
        body = f"hello from pynotify instance {os.environ.get('WORKER_INSTANCE', '0')} (pid {os.getpid()})\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        notify(f"STATUS=served {Handler.served} requests")

    def log_message(self, *args):
        pass


def main():
    server = HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
    notify("READY=1\nSTATUS=listening")
    print(f"pynotify: listening on {server.server_address} (pid {os.getpid()})", file=sys.stderr, flush=True)

    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    if usec > 0 and os.environ.get("PYNOTIFY_HANG") != "1":
        stop = threading.Event()

        def pings():
            while not stop.wait(usec / 2e6):
                notify("WATCHDOG=1")

        threading.Thread(target=pings, daemon=True).start()

    def on_term(signum, frame):
        notify("STOPPING=1\nSTATUS=stopping")
        # shutdown() waits for serve_forever to return: from another thread.
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, on_term)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
