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
# ruff lints the package first. Two pytest workers (pytest-xdist), each given whole test files
# (--dist loadfile: a module's fixtures are built once) and one torch thread (tests/conftest.py):
# the tests are bound by Python on one core each (a single process kept the load at 1.0 and took
# 29 min for this subset; distributing single tests rebuilt module fixtures and was slower).
test: setup
	$(PY) -m ruff check memopt
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

test-all: setup
	$(PY) -m ruff check memopt
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
