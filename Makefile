# The README's two commands: `make serve` and `make test`. Both create .venv on first use.
# `make test` runs the whole suite (CI runs it); `make test-fast` the inner loop: no servers,
# subprocesses, PostgreSQL or Redis, nothing slow, no browser (the markers: pyproject.toml).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
INSTALLED := $(VENV)/.installed

# Bytecode is cached (in __pycache__/, which git ignores) even where the environment says not to, as ours
# does (PYTHONDONTWRITEBYTECODE=1): otherwise every process the suite starts (servers, workers, the CLI)
# compiles the project from source, and each pytest process rewrites every test module's asserts anew
# (docs/operations.md has the timings). The same cache is why .venv's packages are installed without
# compiling them (--no-compile): pip compiles every module of torch and the rest, one at a time, about half
# of .venv's creation; what the API, the worker and the CLI import is compiled once at the end instead,
# before the processes of `make serve` or `make test` would each compile it at once.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: serve test test-fast test-stack lint

$(INSTALLED): pyproject.toml
	@echo "nclab: creating $(VENV) with $(PYTHON) (first run only)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	@echo "nclab: installing torch 2.13.0 (CPU build)"
	# Pinned first and on its own: an unpinned torch resolves to a multi-GB CUDA build.
	$(VENV)/bin/python -m pip install --quiet --no-compile torch==2.13.0
	@echo "nclab: installing nclab and its test tools"
	$(VENV)/bin/python -m pip install --quiet --no-compile -e '.[test]'
	$(VENV)/bin/python -c "import service.api.app, service.cli, worker.tasks"
	touch $@

HOST ?= 127.0.0.1
PORT ?= 8000

serve: $(INSTALLED)
	$(VENV)/bin/nclab serve --host $(HOST) --port $(PORT)

# Two processes (pytest-xdist), each taking whole modules, those with the most tests first (xdist's own
# order; the slow ones first was no faster, docs/operations.md): the suite is CPU-bound and one process
# keeps about one core busy.
TEST_PROCESSES ?= 2

test: $(INSTALLED)
	$(VENV)/bin/pytest -n $(TEST_PROCESSES) --dist loadfile $(PYTEST_ARGS)

test-fast: $(INSTALLED)
	$(VENV)/bin/pytest -m "not stack and not slow and not browser" $(PYTEST_ARGS)

# What test-fast leaves out.
test-stack: $(INSTALLED)
	$(VENV)/bin/pytest -m "stack or slow or browser" $(PYTEST_ARGS)

# Lint, format and type check (pyproject.toml's [tool.ruff] and [tool.mypy]); .ci/run runs it first.
lint: $(INSTALLED)
	$(VENV)/bin/ruff check service worker
	$(VENV)/bin/ruff format --check service worker
	$(VENV)/bin/mypy service worker
