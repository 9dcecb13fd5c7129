"""A WSGI app served by uWSGI on dream's socket.

Run under dream:  dream serve --listen :8080 --ready notify -- uwsgi --ini uwsgi.ini
uWSGI finds the socket in LISTEN_FDS by itself and says READY=1 itself; uwsgi.ini has
what else it needs (HTTP on that socket, SIGTERM as a graceful stop).
"""
import os

RELEASE = os.environ.get("DREAM_RELEASE", "dev")
GENERATION = os.environ.get("DREAM_GENERATION", "0")
BODY = f"<p>release {RELEASE}</p>\n".encode()


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/html"), ("X-Dream-Release", RELEASE),
                              ("X-Dream-Generation", GENERATION),
                              ("Content-Length", str(len(BODY)))])
    return [BODY]
