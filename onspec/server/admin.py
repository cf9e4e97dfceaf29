"""Admin routes (admin key): the speculator's live figures and versions, promote, rollback.

Every call into the online learner runs on the engine thread between two steps (``Bridge.call``), which is
the contract of onspec/server/online.py. Without a learner, promote and rollback answer 409 saying online
learning is off; GET /v1/speculator still reports the speculation strategies' live figures.
"""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from .errors import APIError, bad_request
from .state import ServerState, get_state, require_admin_key

log = logging.getLogger("onspec.server")


class PromoteRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    version: int | str


def add_routes(app: FastAPI) -> None:
    @app.get("/v1/speculator", dependencies=[Depends(require_admin_key)])
    async def speculator(request: Request) -> JSONResponse:
        st = get_state(request)
        snap = st.worker.snapshot
        strategies = {}
        for name, (steps, committed) in snap.by_strategy.items():
            strategies[name] = {"seq_steps": steps, "committed": committed,
                                "acceptance_length": committed / steps if steps else 0.0}
        for name, c in snap.controller.items():
            strategies.setdefault(name, {}).update({"drafted": c["drafted"], "accepted": c["accepted"],
                                                    "verify_steps": c["steps"]})
        learner = None
        if st.handle is not None:
            try:
                learner = await st.bridge.call(lambda _e: st.handle.status())
            except Exception as exc:
                log.exception("online learner status() failed")
                learner = {"error": f"status() failed: {exc.__class__.__name__}"}
        # whether outputs are bit-exact across batches here (onspec/models/compute_path.py): never claimed silently
        body = {"speculation": st.cfg.speculation, "compute_path": st.engine.loaded.compute_path.to_dict(),
                "online_learning": {"enabled": st.handle is not None, "reason": st.handle_reason},
                "strategies": strategies, "decisions": snap.decisions,
                "measured_utility": {str(b): r for b, r in snap.measured_utility.items()},
                "draft_policy": snap.draft_policy,
                "estimated_speedup": snap.plain_seconds_est / snap.spec_seconds if snap.spec_seconds else 1.0,
                "learner": learner, "events": list(st.series.events)[-50:]}
        return JSONResponse(body)

    @app.post("/v1/speculator/promote", dependencies=[Depends(require_admin_key)])
    async def promote(body: PromoteRequest, request: Request) -> JSONResponse:
        st = get_state(request)
        return await _admin_call(st, "promote", lambda h: h.promote(body.version), body.version)

    @app.post("/v1/speculator/rollback", dependencies=[Depends(require_admin_key)])
    async def rollback(request: Request) -> JSONResponse:
        st = get_state(request)
        return await _admin_call(st, "rollback", lambda h: h.rollback(), None)


async def _admin_call(st: ServerState, kind: str, fn, version) -> JSONResponse:
    if st.handle is None:
        raise APIError(409, f"cannot {kind}: {st.handle_reason}", code="online_learning_off")
    handle = st.handle
    try:
        result = await st.bridge.call(lambda _e: fn(handle))
    except KeyError as exc:
        raise APIError(404, f"unknown drafter version: {exc.args[0] if exc.args else version}", "version",
                       "version_not_found") from None
    except ValueError as exc:
        raise bad_request(exc, "version") from None
    result = result if isinstance(result, dict) else {"result": result}
    if "events" not in (st.last_status or {}):  # a learner that reports its own events records this one too
        st.series.add_event(kind, result.get("version", version), "admin request")
    return JSONResponse({"ok": True, kind: result})
