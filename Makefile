# Two entry points (see README): `make demo` runs the main job, `make test` runs the test suite.
# Both set up everything they need: a virtual environment with the CPU build of torch, the
# package, and (as root) the Debian packages the test fleet uses.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint venv system-deps

$(BIN)/deepfleet: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the local CPU wheel, so that no CUDA build is ever pulled in
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/deepfleet

system-deps:
	bash scripts/system-deps.sh

demo: venv
	$(BIN)/deepfleet demo

test: venv system-deps
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check src tests benchmarks
