"""``onspec serve``: parse the options, build the app, run uvicorn with a graceful SIGTERM.

On SIGTERM (or Ctrl-C) the server stops admitting at once (new requests get 503, the listening socket
closes), gives in-flight requests up to ``--shutdown-timeout`` seconds to finish, has the online learner save
its state, and exits 0. A second signal forces the exit.
"""

from __future__ import annotations

import argparse
import logging
import os

from ..config import SPECULATION_MODES
from .settings import ServerConfig


def add_arguments(p: argparse.ArgumentParser, name: str = "serve") -> None:
    d = ServerConfig()
    p.add_argument("--model", default=d.model, help="'default', a model directory, a .gguf file or a hub id")
    p.add_argument("--served-model-name", default="", help="name clients use ('default' is always accepted)")
    p.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float32", "float16"])
    p.add_argument("--host", default=d.host, help="address to bind (0.0.0.0 exposes the server: set --api-key)")
    p.add_argument("--port", type=int, default=d.port)
    # Keys default to environment variables (keeps them out of `ps`); resolved later so --help never shows them.
    p.add_argument("--api-key", default=None, help="key required on /v1 routes [$ONSPEC_API_KEY; none if unset]")
    p.add_argument("--admin-key", default=None,
                   help="key required on admin routes [$ONSPEC_ADMIN_KEY; the API key if unset]")
    p.add_argument("--speculation", default=d.speculation, choices=SPECULATION_MODES)
    p.add_argument("--train", default=d.train, choices=["online", "off"],
                   help="online: learn the drafter from live traffic (needs onspec.train)")
    p.add_argument("--speculator-dir", default=d.speculator_dir, help="where drafter versions are kept")
    p.add_argument("--speculator", default=d.speculator, metavar="PATH",
                   help="an EAGLE-3 or parallel drafter (P-EAGLE) checkpoint directory: with --train online the "
                        "first version (day-1), with --train off served as it is")
    p.add_argument("--train-drafter", default=d.train_drafter, choices=["eagle", "parallel"],
                   help="the drafter --train online learns: the sequential EAGLE-3 head (strategies learned, hybrid) "
                        "or the parallel drafter (strategy parallel: one drafter forward per draft)")
    p.add_argument("--max-concurrency", type=int, default=d.max_concurrency,
                   help="sequences decoded at once (engine cache slots)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="sequences waiting beyond --max-concurrency before new requests get 503")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len, help="context length per sequence")
    p.add_argument("--no-prefix-reuse", action="store_true",
                   help="prefill every prompt in full, even where a freed cache slot still holds its prefix's rows")
    p.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout,
                   help="seconds in-flight requests get to finish on SIGTERM")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning", "error"])
    p.add_argument("--online-hook", default=d.online_hook, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(model=args.model, served_model_name=args.served_model_name, dtype=args.dtype,
                        host=args.host, port=args.port,
                        api_key=args.api_key if args.api_key is not None else os.environ.get("ONSPEC_API_KEY", ""),
                        admin_key=(args.admin_key if args.admin_key is not None
                                   else os.environ.get("ONSPEC_ADMIN_KEY", "")),
                        speculation=args.speculation, train=args.train, speculator_dir=args.speculator_dir,
                        speculator=args.speculator, train_drafter=args.train_drafter,
                        max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                        max_model_len=args.max_model_len, prefix_reuse=not args.no_prefix_reuse,
                        shutdown_timeout=args.shutdown_timeout,
                        num_threads=args.threads, log_level=args.log_level, online_hook=args.online_hook)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("onspec.server")
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach it may use it", cfg.host)
    from .launch import check_port_free
    from .memory import bound_onednn_caches

    check_port_free(cfg.host, cfg.port)

    bound_onednn_caches()  # before any bf16 matrix product: the caches read their capacity once
    from .app import create_app
    from .launch import serve_forever

    log.info("loading %s (speculation %s, online learning %s)", cfg.model, cfg.speculation, cfg.train)
    app = create_app(cfg)
    log.info("dashboard: http://%s:%d/dashboard", cfg.host, cfg.port)
    return serve_forever(app, cfg)
