"""Starting the online drafter learner, if it is installed, and the contract the server expects of it.

``--train online`` calls ``start_online_learning(engine, cfg) -> handle`` from ``onspec.train.online``
(imported lazily: the server works without it, serving with suffix drafting and a warning). ``cfg`` is the
``ServerConfig`` (``speculator_dir``, ``model``, ``speculation`` ...). The hook runs on the main thread
*before* the engine thread starts, so it may attach proposers and step listeners to the engine freely.

The handle must provide::

    status() -> dict     # {"version", "versions": [...], "gates": [...], "live": {... "speedup"?},
                         #  "promotions": int, "rollbacks": int, "trainer_steps": int,
                         #  "events": [{"t": unix time, "kind": "swap"|"promote"|"rollback"|"reject",
                         #              "version": ..., "detail": str}]}   (all keys optional)
    promote(version) -> dict
    rollback() -> dict
    stop(save=True) -> None

Every handle method is called on the engine thread between two steps (so a swap may happen directly, but
a method must never wait for a future step). ``status`` is called about once a second and should be cheap.
``promote``/``rollback`` may raise ``ValueError``/``KeyError`` for a bad version: the server answers 400/404.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any, Protocol

log = logging.getLogger("onspec.server")


class OnlineLearner(Protocol):
    def status(self) -> dict: ...

    def promote(self, version: Any) -> dict: ...

    def rollback(self) -> dict: ...

    def stop(self, save: bool = True) -> None: ...


def start_online_learning(engine, cfg) -> tuple[OnlineLearner | None, str]:
    """Run the hook named by ``cfg.online_hook``; returns (handle or None, why it is None)."""
    if cfg.train != "online":
        return None, "online learning is off (start the server with --train online)"
    module_name, _, func_name = cfg.online_hook.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name is not None and module_name.startswith(exc.name):  # the hook's module itself is missing
            why = f"online learning is unavailable: {module_name} is not installed; serving with suffix drafting"
        else:
            why = f"online learning is unavailable: importing {module_name} failed ({exc}); serving without it"
        log.warning(why)
        return None, why
    hook = getattr(module, func_name, None)
    if hook is None:
        why = f"online learning is unavailable: {module_name} has no {func_name}(); serving with suffix drafting"
        log.warning(why)
        return None, why
    handle = hook(engine, cfg)
    for method in ("status", "promote", "rollback", "stop"):
        if not callable(getattr(handle, method, None)):
            raise TypeError(f"{cfg.online_hook} returned a handle without {method}()")
    log.info("online drafter learning started (%s)", cfg.online_hook)
    return handle, ""
