# emitguard developer tasks. Everything runs from the project-local .venv.
PY ?= python3

VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

# Only lint paths that exist (benchmarks/ or tests/ may not exist yet);
# a missing path would make ruff fail with E902.
LINT_PATHS := $(wildcard src adapters plugin tests benchmarks)

.PHONY: venv test chaos demo lint bench clean distclean

venv: $(STAMP)

# The interpreter is an order-only prerequisite: creating the venv once is
# enough; only pyproject.toml changes trigger a reinstall.
$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

test: venv
	$(BIN)/python -m pytest --cov --cov-report=term-missing

# The chaos-and-abuse suite, ten times CI's size (EMITGUARD_CHAOS_SCALE multiplies its counts).
chaos: venv
	EMITGUARD_CHAOS_SCALE=10 $(BIN)/python -m pytest -p no:cacheprovider -s tests/adapters/test_chaos_hub.py tests/adapters/test_chaos_sse.py

demo: venv
	$(BIN)/emitguard demo

lint: venv
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/mypy --strict src adapters plugin

bench: venv
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/sockets.py
	$(BIN)/python benchmarks/stall.py

# Build artefacts and tool caches; keeps .venv (use distclean for that).
clean:
	rm -rf build dist *.egg-info htmlcov .coverage .coverage.* coverage.xml \
		.pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
