"""A WSGI app served by gunicorn on dream's socket.

Run under dream:  dream serve --listen :8080 -- gunicorn --bind fd://0 --workers 1 app:app
gunicorn takes the already-listening fd 0 and never binds; SIGTERM is its graceful stop.
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
