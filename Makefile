# Two entry points on a fresh clone: `make demo` (the demo study) and `make test` (the tests).
# Both create .venv and install what they need. torch/torchvision are pinned to the wheels
# this machine serves from its own disk; elsewhere pip fetches the same releases.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
# Test processes (pytest-xdist; one torch thread each); a test file runs in one of them.
TEST_WORKERS ?= 2

.PHONY: demo test lint install install-dev clean-results

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,dashboard,postgres,export]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m flows.study

test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-results:
	rm -rf studies/optuna.db studies/cache studies/data studies/demo
