# Two commands do all set-up on a fresh machine (Python 3.10+, a C++ compiler):
#   make demo    build everything into .venv and run the embedded demo (sklearn digits)
#   make test    build everything into .venv and run the test suite (C++ core, ops, engine, benches)
# The extension is rebuilt when csrc/ or setup.py change.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mucs_fast-installed
SRC    := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)
# CPU torch from the pinned wheel; pass TORCH_SPEC= to keep a torch you installed yourself.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): $(SRC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q $(TORCH_SPEC) pybind11 ninja
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,text]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mucs-fast demo $(ARGS)

LINTED := mucs_fast tests benches kernels setup.py

test: $(STAMP)
	$(BIN)/ruff check $(LINTED) && $(BIN)/ruff format --check -q $(LINTED)
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build/cmake -j2 >/dev/null \
		&& ctest --test-dir build/cmake --output-on-failure
	$(BIN)/python -m pytest -q tests benches --benchmark-disable $(ARGS)

clean:
	rm -rf build $(VENV) *.egg-info mucs_fast/_C*.so
