# Two entry points (see README): `make demo` runs the main job, `make test` runs the test suite.
# Both set up everything they need: a virtual environment with the CPU build of torch, the
# package, and (as root) the Debian packages the test fleet uses.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# EXTRAS=test,litert also installs the LiteRT converter and runtime (model.tflite, backend litert;
# ~1.2 GB); its tests are skipped without it. torch stays pinned while the extra resolves.
EXTRAS ?= test

.PHONY: demo test test-litert lint venv system-deps

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

# The LiteRT extra in its own environment (it pins typing_extensions below what the test
# extra's selenium needs in the main one, and converting every artifact would slow the suite):
# the tests that need the converter or the interpreter, which skip in the main environment.
LITERT_TESTS := tests/test_litert.py tests/device_agent/test_litert_backend.py \
	tests/device_agent/test_backend_contract.py tests/test_calibration.py

test-litert: system-deps
	$(MAKE) venv VENV=.venv-litert EXTRAS=test,litert
	.venv-litert/bin/python -m pytest -q $(LITERT_TESTS)

lint: venv
	$(BIN)/ruff check src tests benchmarks
