"""`sdgen serve`: the model kept loaded behind AUTOMATIC1111's web API, OpenAI's images endpoint and a web page.

    from sdgen.serve import Settings, create_app, serve
    serve(Settings(model="demo"), host="127.0.0.1", port=7860)       # blocks; Ctrl-C stops it
    with Background(create_app(Settings(model="demo"))) as url: ...  # in a thread, on a free port (tests, benchmarks)

app.py (routes, auth, limits) -> schemas.py (request shapes) + worker.py (queue, the one model) + library.py
(which files may be used) + preview.py (live previews); page/ is the web page, plain HTML and JavaScript.
"""

from __future__ import annotations

import socket
import sys
import threading
import time

from .. import SdgenError
from .app import Settings, create_app
from .schemas import Limits

__all__ = ["Settings", "Limits", "create_app", "serve", "Background"]


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 7860, log=None) -> None:
    """Load the model, then serve until interrupted."""
    import uvicorn

    from .app import parse_auth

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    parse_auth(settings.api_auth)   # bad options are said before the port is taken or the model loaded
    sock = _bind(host, port)    # before the (slow) load: a taken port is said at once
    app = create_app(settings, log=log)
    shown = f"[{host}]" if ":" in host else host
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.api_auth:
        log(f"warning: listening on {host} without --api-auth: anyone who can reach this machine can use it")
    log(f"sdgen serve: http://{shown}:{sock.getsockname()[1]}/ (the page), /docs (the API), "
        f"queue {settings.queue_size}; Ctrl-C stops")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    server.run(sockets=[sock])


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SdgenError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(2048)   # from now on a client that connects waits in the backlog until the server accepts
    sock.set_inheritable(True)
    return sock


class Background:
    """A server in a thread of this process on 127.0.0.1 and a free port: `with Background(app) as url: ...`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = _bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
