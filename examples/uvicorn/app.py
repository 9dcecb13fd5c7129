"""An ASGI app served by uvicorn on dream's socket.

Run under dream:  dream serve --listen :8080 -- uvicorn --fd 0 app:app
uvicorn takes the already-listening fd 0; SIGTERM is its graceful stop.
"""
import os

RELEASE = os.environ.get("DREAM_RELEASE", "dev")
GENERATION = os.environ.get("DREAM_GENERATION", "0")
BODY = f"<p>release {RELEASE}</p>\n".encode()


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/html"), (b"x-dream-release", RELEASE.encode()),
        (b"x-dream-generation", GENERATION.encode()),
        (b"content-length", str(len(BODY)).encode())]})
    await send({"type": "http.response.body", "body": BODY})
