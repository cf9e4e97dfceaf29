"""Running the app under uvicorn: in the foreground with a graceful SIGTERM, or on a background thread.

``serve_forever`` is what ``onspec serve`` runs. ``BackgroundServer`` runs a real server on a loopback port
inside the current process (tests, notebooks): ``with BackgroundServer(app) as srv: srv.url``.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from .settings import ServerConfig


class GracefulServer(uvicorn.Server):
    """uvicorn's server, but the first exit signal also stops admission at once (503, not a queue)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._onspec_app = app

    def handle_exit(self, sig, frame) -> None:
        self._onspec_app.state.onspec.bridge.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after its graceful shutdown (so the process dies "of" SIGTERM);
        # a completed graceful shutdown is a clean exit, so exit 0 instead. Ctrl-C keeps its usual meaning.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list) and sig == signal.SIGTERM:
            while signal.SIGTERM in captured:
                captured.remove(signal.SIGTERM)


def _uvicorn_config(app: FastAPI, host: str, port: int, cfg: ServerConfig, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                          timeout_graceful_shutdown=max(1, int(cfg.shutdown_timeout + 0.999)),
                          lifespan="on", timeout_keep_alive=5)


def check_port_free(host: str, port: int) -> None:
    """Raise ``ValueError`` (the CLI's one line and exit 2) when ``host:port`` cannot be bound, before the
    model loads: uvicorn would find out only after loading and exit with its own code 3."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"host: cannot resolve {host!r}: {exc}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind(addr)
        except OSError as exc:
            raise ValueError(f"port: cannot listen on {host}:{port} ({exc.strerror}); is another server "
                             "running there? Pick another --port") from None


def serve_forever(app: FastAPI, cfg: ServerConfig) -> int:
    server = GracefulServer(_uvicorn_config(app, cfg.host, cfg.port, cfg, cfg.log_level), app)
    server.run()
    return 0 if server.started else 1


class BackgroundServer:
    """A real uvicorn server for ``app`` on ``host:port`` (0: a free port) in a daemon thread."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 start_timeout: float = 60.0) -> None:
        cfg = app.state.onspec.cfg
        self.app = app
        self.server = GracefulServer(_uvicorn_config(app, host, port, cfg, log_level), app)
        self.host = host
        self.start_timeout = start_timeout
        self.thread: threading.Thread | None = None
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "BackgroundServer":
        self.thread = threading.Thread(target=self.server.run, name="onspec-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.02)
        sock = self.server.servers[0].sockets[0]
        self.port = sock.getsockname()[1]
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.app.state.onspec.bridge.draining = True
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
