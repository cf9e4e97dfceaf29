"""Helpers shared by the server tests (no tests here): a chat-capable tiny model, a fake online learner,
a server-in-a-thread context manager and polling."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from pathlib import Path

from conftest import make_tiny_model
from onspec.models.loader import resolve_model_dir
from onspec.server.app import build_engine, create_app
from onspec.server.launch import BackgroundServer
from onspec.server.settings import ServerConfig


def make_chat_model(out: Path) -> Path:
    """A tiny random llama whose vocabulary covers the real tokenizer (so any text is a valid prompt), with
    the default model's chat template and a long position range (long generations for abort tests)."""
    make_tiny_model(out, "llama", vocab_size=49152)
    src = resolve_model_dir("default")
    for f in src.iterdir():
        if f.name.startswith("chat_template"):
            shutil.copy(f, out / f.name)
    cfg = json.loads((out / "config.json").read_text())
    cfg["max_position_embeddings"] = 8192
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def tiny_config(model_dir: Path, **kw) -> ServerConfig:
    base = dict(model=str(model_dir), dtype="float32", max_model_len=4096, max_concurrency=16, max_queue=48,
                shutdown_timeout=5.0)
    base.update(kw)
    return ServerConfig(**base)


@contextlib.contextmanager
def running_server(cfg: ServerConfig, engine=None, handle=None):
    app = create_app(cfg, engine=engine if engine is not None else build_engine(cfg), handle=handle,
                     start_learning=False)
    srv = BackgroundServer(app).start()
    try:
        yield srv
    finally:
        srv.stop()


def wait_until(cond, timeout: float = 15.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeLearner:
    """Stands in for onspec.train.online's handle; records which thread called it."""

    def __init__(self) -> None:
        self.version = 1
        self.versions = [1, 2, 3]
        self.calls: list[tuple[str, str]] = []
        self.events = [{"t": time.time(), "kind": "swap", "version": 1, "detail": "first version"}]
        self.stopped_with: bool | None = None

    def _note(self, what: str) -> None:
        self.calls.append((what, threading.current_thread().name))

    def status(self) -> dict:
        self._note("status")
        return {"version": self.version, "versions": self.versions, "promotions": 2, "rollbacks": 1,
                "trainer_steps": 42, "gates": [{"version": 2, "kept": True}],
                "live": {"speedup": 1.25}, "events": list(self.events)}

    def promote(self, version) -> dict:
        self._note("promote")
        if version not in self.versions:
            raise KeyError(version)
        self.version = version
        self.events.append({"t": time.time(), "kind": "promote", "version": version})
        return {"version": version}

    def rollback(self) -> dict:
        self._note("rollback")
        self.version = max(1, self.version - 1)
        self.events.append({"t": time.time(), "kind": "rollback", "version": self.version})
        return {"version": self.version}

    def stop(self, save: bool = True) -> None:
        self._note("stop")
        self.stopped_with = save
