#!/usr/bin/env python3
"""badworker — a worker that misbehaves by request path, for `load-tests/rel/misbehave.py`
(issue 11, group 5). Standard library only, one thread per connection, blocking sockets.

Worker contract: listens on 127.0.0.1:$PORT, or accepts on fd 3 when LISTEN_FDS=1 and LISTEN_PID
is this process. No health path: run it without one (ready when the port accepts). SIGTERM ends
it (default disposition). Keep-alive: requests are read one after another on a connection (GET
only, no request bodies).

| path             | answer                                                                        |
|------------------|-------------------------------------------------------------------------------|
| /ok              | 200 `ok` (keep-alive)                                                         |
| /never-cl        | 200 with Content-Length 1000000, 100 body bytes, then silence                 |
| /never-chunked   | 200 chunked, one 5-byte chunk, then silence                                   |
| /mid-close       | 200 with Content-Length 1000, 100 body bytes, then close                      |
| /no-answer       | reads the request, never answers                                              |
| /1g              | 200 with Content-Length 1 GiB, written in 64 KiB blocks as fast as it goes    |
| /big-header      | a 1 MiB header field (`X-Big: aaaa…`), then Content-Length 0                  |
| /stats           | JSON: this instance's record of each misbehaving request (below)              |

A silence is held until the peer (tqproxy) closes the connection, at most HOLD_S (60) seconds.
Each misbehaving request adds a record to /stats: `{"seq", "pid", "path", "sent" (body bytes written),
"held_s" (from the request to the end: the peer closed, a write failed, or HOLD_S), "end"
("peer closed", "write failed: <error>", "done", "hold limit")}`, so the caller can tell when
tqproxy dropped the upstream connection.
"""

import json
import os
import socket
import sys
import threading
import time

HOLD_S = 60
RECORDS = []
LOCK = threading.Lock()
SEQ = [0]


def record(path, sent, t0, end):
    with LOCK:
        SEQ[0] += 1
        RECORDS.append({"seq": SEQ[0], "pid": os.getpid(), "path": path, "sent": sent,
                        "held_s": round(time.monotonic() - t0, 3), "end": end})
        del RECORDS[:-200]


def hold(conn, t0):
    """Waits until the peer closes (or HOLD_S): what ended it."""
    conn.settimeout(0.2)
    while time.monotonic() - t0 < HOLD_S:
        try:
            if conn.recv(65536) == b"":
                return "peer closed"
        except socket.timeout:
            continue
        except OSError as e:
            return f"peer closed ({e.__class__.__name__})"
    return "hold limit"


def send(conn, data):
    conn.sendall(data)


def serve(conn):
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
                if len(buf) > 1 << 20:
                    return
            head, buf = buf.split(b"\r\n\r\n", 1)
            line = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            path = line[1].split("?", 1)[0] if len(line) > 1 else "/"
            t0 = time.monotonic()
            if path == "/ok":
                send(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            elif path == "/stats":
                with LOCK:
                    body = json.dumps({"pid": os.getpid(), "records": RECORDS}).encode()
                send(conn, b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % len(body) + body)
            elif path == "/never-cl":
                send(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100)
                record(path, 100, t0, hold(conn, t0))
                return
            elif path == "/never-chunked":
                send(conn, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                record(path, 5, t0, hold(conn, t0))
                return
            elif path == "/mid-close":
                send(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
                record(path, 100, t0, "closed by the worker")
                return
            elif path == "/no-answer":
                record(path, 0, t0, hold(conn, t0))
                return
            elif path == "/1g":
                total, sent, block = 1 << 30, 0, b"x" * 65536
                end = "done"
                try:
                    send(conn, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
                    while sent < total and time.monotonic() - t0 < HOLD_S:
                        conn.sendall(block)
                        sent += len(block)
                    if sent < total:
                        end = "hold limit"
                except OSError as e:
                    end = f"write failed: {e.__class__.__name__}"
                record(path, sent, t0, end)
                return
            elif path == "/big-header":
                try:
                    send(conn, b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (1 << 20) + b"\r\nContent-Length: 0\r\n\r\n")
                    end = "sent"
                except OSError as e:
                    end = f"write failed: {e.__class__.__name__}"
                record(path, 0, t0, end)
                return
            else:
                send(conn, b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n")
    except OSError:
        pass
    finally:
        conn.close()


def listener():
    if os.environ.get("LISTEN_FDS") == "1" and os.environ.get("LISTEN_PID") == str(os.getpid()):
        return socket.socket(fileno=3)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(os.environ["PORT"])))
    s.listen(128)
    return s


def main():
    s = listener()
    print(f"badworker: pid {os.getpid()} listening", file=sys.stderr, flush=True)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
