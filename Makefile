# The README's two commands: `make serve` and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
INSTALLED := $(VENV)/.installed

.PHONY: serve test

$(INSTALLED): pyproject.toml
	@echo "nclab: creating $(VENV) with $(PYTHON) (first run only)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	@echo "nclab: installing torch 2.13.0 (CPU build)"
	# Pinned first and on its own: an unpinned torch resolves to a multi-GB CUDA build.
	$(VENV)/bin/python -m pip install --quiet torch==2.13.0
	@echo "nclab: installing nclab and its test tools"
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $@

HOST ?= 127.0.0.1
PORT ?= 8000

serve: $(INSTALLED)
	$(VENV)/bin/nclab serve --host $(HOST) --port $(PORT)

test: $(INSTALLED)
	$(VENV)/bin/pytest
