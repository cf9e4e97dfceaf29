"""What every route reads: the server's state (engine thread, bridge, metrics, learner) and the key checks.

Keys are sent as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` and compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from .bridge import Bridge, EngineWorker
from .errors import APIError
from .metrics import SeriesRecorder, ServerMetrics
from .online import OnlineLearner
from .settings import ServerConfig


@dataclass
class ServerState:
    """One per app (``app.state.onspec``); the engine itself is touched only through ``worker``/``bridge``."""

    cfg: ServerConfig
    engine: Any
    worker: EngineWorker
    bridge: Bridge
    metrics: ServerMetrics
    series: SeriesRecorder
    model_name: str
    handle: OnlineLearner | None = None
    handle_reason: str = ""
    started: float = field(default_factory=time.time)
    requests_total: int = 0
    last_status: dict | None = None
    sampler: asyncio.Task | None = None

    # ---- checks ----------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name not in self.model_names():
            raise APIError(404, f"model '{name}' is not served here; use one of {self.model_names()}", "model",
                           "model_not_found")

    def model_names(self) -> list[str]:
        names = [self.model_name, "default"]
        if self.cfg.served_model_name and self.cfg.served_model_name not in names:
            names.insert(0, self.cfg.served_model_name)
        return list(dict.fromkeys(names))


def _key_of(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token:
        return token.strip()
    return request.headers.get("x-api-key", "").strip()


def _check_key(request: Request, expected: str, what: str) -> None:
    if not expected:
        return
    given = _key_of(request)
    if not given:
        raise APIError(401, f"missing {what}: send 'Authorization: Bearer <key>'", code="missing_api_key")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise APIError(401, f"incorrect {what}", code="invalid_api_key")


def get_state(request: Request) -> ServerState:
    return request.app.state.onspec


def require_api_key(request: Request) -> None:
    _check_key(request, get_state(request).cfg.api_key, "API key")


def require_admin_key(request: Request) -> None:
    _check_key(request, get_state(request).cfg.effective_admin_key, "admin key")
