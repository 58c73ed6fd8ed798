# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv, install the CPU build of torch 2.13.0 when no torch is present (never a
# multi-GB CUDA download), then memopt itself, editable, with its test extra.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.memopt-installed

.PHONY: setup demo test test-all clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: setup
	$(PY) examples/finetune.py

# `make test` (CI): everything but the tests marked slow — a representative subset, under 20 minutes on
# 2 cores (examples/ included, at a tiny size). `make test-all`: the whole suite (the slow scenario tests too).
# ruff lints the package first. One pytest process: torch already uses both cores, and the
# longest test modules share module-scoped fixtures (tried: pytest-xdist on 2 cores was slower).
test: setup
	$(PY) -m ruff check memopt
	$(PY) -m pytest -q -m "not slow"

test-all: setup
	$(PY) -m ruff check memopt
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
