# Set-up and the two jobs: `make demo` (the main job, no downloads) and `make test` (the test suite).
# Both create their own virtual environment in .venv on first use. On machines without CUDA, torch is
# pinned to the CPU build 2.13.0; with CUDA the newest torch build is taken.
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,media
BUILD ?= build
# Python started here must not put the checkout on sys.path: its kernels/ folder would shadow the PyPI package
# `kernels` that transformers imports (the engine is installed as lipforcing.kernels).
export PYTHONSAFEPATH := 1

.PHONY: setup native demo test test-all lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q torch; \
	else \
		$(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps mediapipe==0.10.21
	touch $@

demo: setup
	$(VENV)/bin/lipforcing demo -o demo.mp4

# The C ABI, lipforcing_host and their ctest cases (CMakeLists.txt), against the Python of $(VENV).
native: setup
	cmake -S . -B $(BUILD) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPython3_EXECUTABLE=$(abspath $(PY)) >/dev/null
	cmake --build $(BUILD)

test: setup native
	$(PY) -m pytest -q -p no:cacheprovider --durations=25
	ctest --test-dir $(BUILD) --output-on-failure -j2

test-all: test  # every case already runs in make test (CI)

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
