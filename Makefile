# emitguard developer tasks. Development runs from the project-local .venv (the `dev` extra);
# the demo runs from its own .venv-demo with only the `demo` extra, so a fresh clone's
# `make demo` installs a handful of packages instead of the whole toolchain.
PY ?= python3

VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

DEMO_VENV  := .venv-demo
DEMO_BIN   := $(DEMO_VENV)/bin
DEMO_STAMP := $(DEMO_VENV)/.installed

# Only lint paths that exist (benchmarks/ or tests/ may not exist yet);
# a missing path would make ruff fail with E902.
LINT_PATHS := $(wildcard src adapters plugin tests benchmarks)

# The official Socket.IO client for tests/adapters/test_socketio_js.py and the browser test,
# from tests/js/package-lock.json (without npm those tests skip and say why).
JS       := tests/js
JS_STAMP := $(JS)/node_modules/.installed

.PHONY: venv js demo-venv test chaos demo lint bench dist clean distclean

venv: $(STAMP)

# The interpreter is an order-only prerequisite: creating the venv once is
# enough; only pyproject.toml changes trigger a reinstall.
$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

js: $(JS_STAMP)

$(JS_STAMP): $(JS)/package.json $(JS)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix $(JS) --no-audit --no-fund && touch $@; \
	else \
		echo "npm is not installed: the Socket.IO client tests will skip"; \
	fi

demo-venv: $(DEMO_STAMP)

$(DEMO_BIN)/python:
	$(PY) -m venv $(DEMO_VENV)

$(DEMO_STAMP): pyproject.toml | $(DEMO_BIN)/python
	$(DEMO_BIN)/python -m pip install --quiet -e '.[demo]'
	touch $@

# coverage starts before pytest, so the pytest11 plugin (imported while pytest loads its
# plugins) is measured like everything else.
test: venv js
	$(BIN)/python -m coverage run -m pytest
	$(BIN)/python -m coverage report

# The chaos-and-abuse suite, ten times CI's size (EMITGUARD_CHAOS_SCALE multiplies its counts).
chaos: venv
	EMITGUARD_CHAOS_SCALE=10 $(BIN)/python -m pytest -p no:cacheprovider -s tests/adapters/test_chaos_hub.py tests/adapters/test_chaos_sse.py

demo: demo-venv
	$(DEMO_BIN)/emitguard demo

# The wheel and sdist in dist/ (see docs/index.md, "Installing from a checkout").
dist: venv
	$(BIN)/python -m build

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy --strict src adapters plugin

bench: venv
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/sockets.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/stall.py
	$(BIN)/python benchmarks/redis_outbox.py
	$(BIN)/python benchmarks/socketio_server.py
	$(BIN)/python benchmarks/channels_layer.py

# Build artefacts and tool caches; keeps .venv (use distclean for that).
clean:
	rm -rf build dist *.egg-info htmlcov .coverage .coverage.* coverage.xml \
		.pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . \( -path ./$(VENV) -o -path ./$(DEMO_VENV) \) -prune -o -type d -name __pycache__ \
		-prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(DEMO_VENV) $(JS)/node_modules
