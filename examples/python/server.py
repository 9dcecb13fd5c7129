"""A worker in plain Python: takes its listening socket from fd 0 (inetd style).

Run under dream:  dream serve --listen :8080 --ready notify -- python3 server.py
It answers every request with the release it runs in, says READY=1 when it is
accepting, and on SIGTERM stops accepting, finishes what it holds, and exits.
"""
import os
import select
import signal
import socket
import threading

RELEASE = os.environ.get("DREAM_RELEASE", "dev")
GENERATION = os.environ.get("DREAM_GENERATION", "0")
# dream's socket: accept only, never bind. It is shared with every other
# worker, so its flags are left alone (no settimeout, no setblocking): it may
# be blocking or not, as another worker left it (doc/protocol.md).
listener = socket.socket(fileno=0)
stopping = threading.Event()
in_select = False


class Stop(Exception):
    pass


def on_term(*_):
    stopping.set()
    # Break out of select() only: never out of accept(), which may already
    # hold a connection (a blocking accept is retried and serves one more).
    if in_select:
        raise Stop


signal.signal(signal.SIGTERM, on_term)


def notify(state):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), path)


def handle(conn):
    with conn:
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                return
            data += chunk
        body = f"<p>release {RELEASE}</p>\n".encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
            + f"X-Dream-Release: {RELEASE}\r\nX-Dream-Generation: {GENERATION}\r\n".encode()
            + f"Content-Length: {len(body)}\r\n".encode()
            + b"Connection: close\r\n\r\n"
            + body
        )


workers = []
notify("READY=1")
try:
    while not stopping.is_set():
        try:
            in_select = True
            select.select([listener], [], [])
        finally:
            in_select = False
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            continue  # another worker took it: nothing now
        t = threading.Thread(target=handle, args=(conn,))
        t.start()
        workers.append(t)
except Stop:
    pass
for t in workers:
    t.join()
