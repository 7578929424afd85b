"""gunicorn — a WSGI application served by Debian's gunicorn, behind tqproxy.

tqproxy binds the listening socket and passes it as fd 3 (the worker runs in a network
namespace of its own, where only `lo` exists): `gunicorn --bind fd://3` serves on it, so
neither gunicorn nor this file knows a port. gunicorn's own SIGTERM is graceful: its arbiter
stops accepting, lets each worker finish its request in flight (up to --graceful-timeout) and
exits. Nothing here is tqproxy-specific: any WSGI application (Flask's `app`, Django's
`application`) runs the same way.

    GET /health       ok
    GET /slow?ms=N    "slow done" after N ms (at most 60000)
    anything else     hello from gunicorn <name> instance <id> generation <gen> (pid <pid>)
"""

import os
import time
from urllib.parse import parse_qs


def _env(name, default):
    value = os.environ.get(name, "")
    return "".join(c for c in value if c.isprintable()) or default


NAME = _env("WORKER_NAME", "gunicorn")
INSTANCE = _env("WORKER_INSTANCE", "0")
GENERATION = _env("WORKER_GENERATION", "0")


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    status = "200 OK"
    if path == "/health":
        body = b"ok\n"
    elif path == "/slow":
        try:
            ms = int(parse_qs(environ.get("QUERY_STRING", "")).get("ms", ["100"])[0])
        except ValueError:
            ms = -1
        if not 0 <= ms <= 60_000:
            status, body = "400 Bad Request", b"ms: 0 to 60000\n"
        else:
            time.sleep(ms / 1000)
            body = b"slow done\n"
    else:
        body = (
            f"hello from gunicorn {NAME} instance {INSTANCE} generation {GENERATION} "
            f"(pid {os.getpid()})\n"
        ).encode()
    start_response(
        status,
        [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
         ("X-Instance", INSTANCE), ("X-Generation", GENERATION)],
    )
    return [body]
