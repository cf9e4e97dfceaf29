"""The FastAPI application: OpenAI routes, admin routes, metrics, dashboard.

Routes and who may call them (keys are sent as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``):

    POST /v1/completions, /v1/chat/completions, GET /v1/models[/{id}]   API key (when --api-key is set)
    GET  /v1/dashboard/series                                           API key (when --api-key is set)
    GET  /v1/speculator, POST /v1/speculator/promote|rollback           admin key (falls back to the API
                                                                        key; open when neither is set)
    GET  /health, /metrics, /dashboard                                   public (as in vLLM; the dashboard
                                                                        page holds no data, its series do)

The dashboard page reads an API key from its URL fragment (``/dashboard#key=...``, never sent to the server
in the URL) when one is needed. Generation goes through ``Bridge`` to the engine thread; the handlers only
validate, reserve capacity, and translate chunks into the OpenAI wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from ..config import EngineConfig, SpecConfig
from . import admin, generate
from . import protocol as P
from .bridge import Bridge, EngineWorker
from .errors import install_error_handlers
from .memory import MemoryTrimmer
from .metrics import SeriesRecorder, ServerMetrics, SpeedupMeter
from .online import OnlineLearner, start_online_learning
from .settings import ServerConfig
from .state import ServerState, get_state, require_admin_key, require_api_key

log = logging.getLogger("onspec.server")
DASHBOARD_DIR = Path(__file__).parent / "dashboard"


def build_engine(cfg: ServerConfig):
    """The engine exactly as ``LLM(...)`` builds it, sized by the server's options."""
    from ..engine.engine import Engine

    spec = SpecConfig(mode=cfg.speculation)
    engine = Engine(EngineConfig(model=cfg.model, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                                 max_num_seqs=cfg.max_concurrency, max_num_batched_tokens=cfg.max_num_batched_tokens,
                                 num_threads=cfg.num_threads, prefix_reuse=cfg.prefix_reuse, spec=spec))
    if cfg.train == "online":
        # The online learner attaches the learned drafter itself (cfg.speculator becomes its first version).
        from ..speculation.controller import attach_speculation

        attach_speculation(engine, spec)
    else:
        from ..train.frozen import attach_for_mode

        attach_for_mode(engine, spec, speculator=cfg.speculator, versions_dir=cfg.speculator_dir)
    return engine


class _RouteMetrics:
    """Pure ASGI middleware (BaseHTTPMiddleware would break streaming and disconnect detection)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "other"
            st = getattr(scope.get("app"), "state", None)
            state = getattr(st, "onspec", None) if st is not None else None
            if state is not None:
                state.metrics.requests.labels(path, str(status["code"])).inc()


def create_app(cfg: ServerConfig, engine=None, handle: OnlineLearner | None = None,
               start_learning: bool = True) -> FastAPI:
    """Build the app. ``engine``: reuse an existing engine (tests); ``handle``: an online learner to use."""
    if engine is None:
        engine = build_engine(cfg)
    reason = "online learning is off (start the server with --train online)"
    if handle is None and start_learning:
        handle, reason = start_online_learning(engine, cfg)
    meter = SpeedupMeter(engine=engine)
    worker = EngineWorker(engine, meter=meter, trimmer=MemoryTrimmer())
    bridge = Bridge(worker, cfg.capacity, cfg.retry_after)
    series = SeriesRecorder(maxlen=cfg.series_seconds)
    state_box: dict[str, ServerState] = {}
    metrics = ServerMetrics(snapshot_fn=lambda: worker.snapshot,
                            status_fn=lambda: state_box["s"].last_status,
                            outstanding_fn=lambda: bridge.outstanding,
                            learning_fn=lambda: state_box["s"].handle is not None)
    meter.step_histogram = metrics.step_seconds
    engine.events.subscribe(meter)
    state = ServerState(cfg=cfg, engine=engine, worker=worker, bridge=bridge, metrics=metrics, series=series,
                        model_name=cfg.served_model_name or engine.loaded.name, handle=handle,
                        handle_reason="" if handle is not None else reason)
    state_box["s"] = state

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start(asyncio.get_running_loop())
        state.sampler = asyncio.create_task(_sample_forever(state))
        try:
            yield
        finally:
            await _shutdown(state)

    app = FastAPI(title="onspec", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible server with speculative decoding whose drafter learns online.")
    app.state.onspec = state
    install_error_handlers(app)
    app.add_middleware(_RouteMetrics)
    _add_routes(app)
    generate.add_routes(app)
    admin.add_routes(app)
    app.mount("/dashboard/assets", StaticFiles(directory=DASHBOARD_DIR), name="dashboard-assets")
    return app


def _version() -> str:
    from .. import __version__

    return __version__


async def _sample_forever(state: ServerState) -> None:
    """Once a second: ask the learner for its status (engine thread) and add a point to the series."""
    failures = 0
    while True:
        await asyncio.sleep(1.0)
        try:
            if state.handle is not None and state.worker.alive:
                try:
                    state.last_status = await asyncio.wait_for(state.bridge.call(lambda _e: state.handle.status()),
                                                               timeout=5.0)
                except Exception:
                    failures += 1
                    if failures in (1, 10, 100):
                        log.exception("online learner status() failed (%d times)", failures)
            state.series.sample(state.worker.snapshot, state.requests_total, state.last_status)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("metrics sampling failed")


async def _shutdown(state: ServerState) -> None:
    """Stop admitting, let in-flight requests finish (bounded), save the learner, stop the engine thread."""
    state.bridge.draining = True
    deadline = time.monotonic() + state.cfg.shutdown_timeout
    while state.bridge.outstanding > 0 and time.monotonic() < deadline and state.worker.alive:
        await asyncio.sleep(0.05)
    if state.sampler is not None:
        state.sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await state.sampler
    if state.handle is not None:
        try:
            if state.worker.alive:
                await asyncio.wait_for(state.bridge.call(lambda _e: state.handle.stop(save=True)),
                                       timeout=max(5.0, state.cfg.shutdown_timeout))
            else:
                state.handle.stop(save=True)
            log.info("online learner stopped and saved")
        except Exception:
            log.exception("stopping the online learner failed")
    await asyncio.to_thread(state.worker.stop, 10.0)


# ---- routes ------------------------------------------------------------------------------------------
def _add_routes(app: FastAPI) -> None:
    @app.get("/health", include_in_schema=True)
    async def health(request: Request) -> JSONResponse:
        st = get_state(request)
        if not st.worker.alive:
            return JSONResponse({"status": "engine stopped"}, status_code=503)
        if st.bridge.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body = get_state(request).metrics.render()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    @app.get("/dashboard", include_in_schema=False)
    @app.get("/dashboard/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html")
    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def list_models(request: Request) -> JSONResponse:
        st = get_state(request)
        created = int(st.started)
        return JSONResponse({"object": "list", "data": [P.model_card(n, created) for n in st.model_names()]})

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_api_key)])
    async def get_model(model_id: str, request: Request) -> JSONResponse:
        st = get_state(request)
        st.check_model(model_id)
        return JSONResponse(P.model_card(model_id, int(st.started)))

    @app.get("/v1/dashboard/series", dependencies=[Depends(require_api_key)])
    async def dashboard_series(request: Request, since: float = 0.0) -> JSONResponse:
        st = get_state(request)
        snap = st.worker.snapshot
        version = (st.last_status or {}).get("version")
        meta = {"model": st.model_name, "speculation": st.cfg.speculation, "online_learning": st.handle is not None,
                "online_learning_reason": st.handle_reason, "drafter_version": version,
                "uptime_s": round(time.time() - st.started, 1), "requests_total": st.requests_total,
                "generated_tokens": snap.generated_tokens, "max_concurrency": st.cfg.max_concurrency,
                "server_time": time.time()}
        return JSONResponse({"meta": meta, **st.series.to_json(since)})


__all__ = ["create_app", "build_engine", "ServerState", "ServerConfig", "require_api_key", "require_admin_key"]
