# Two entry points (see README): `make demo` runs the main job, `make test` runs the test suite.
# Both set up everything they need: a virtual environment with the CPU build of torch, the
# package, and (as root) the Debian packages the test fleet uses.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# EXTRAS=test,litert also installs the LiteRT converter and runtime (model.tflite, backend litert;
# ~1.2 GB); its tests are skipped without it. torch stays pinned while the extra resolves.
EXTRAS ?= test

.PHONY: demo test lint venv system-deps

$(BIN)/deepfleet: pyproject.toml constraints-torch.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the local CPU wheel, so that no CUDA build is ever pulled in
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints-torch.txt -e '.[$(EXTRAS)]'
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
