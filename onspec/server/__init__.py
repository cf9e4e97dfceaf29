"""The OpenAI-compatible server: ``onspec serve``.

Modules, one job each: settings (ServerConfig), protocol (OpenAI request models and response shapes),
errors (OpenAI error bodies, no 500 for bad input), bridge (the engine thread and the asyncio side),
metrics (Prometheus, speedup estimate, dashboard series), online (the online-learning hook and its
contract), memory (hand freed heap back to the OS when idle), state (shared state, API keys),
generate / admin (routes), app (assembly), launch (uvicorn, graceful SIGTERM), commands (the CLI),
dashboard/ (the static page and its own small chart code).
"""
