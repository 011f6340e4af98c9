# `make bench`: the main job (benchmarks with their parity checks). `make test`: the test suite.
# Both create .venv with the pinned requirements if it is missing and (re)build the extension.
# `make lint`: ruff and clang-format. `make gpu-check`: the checks only a GPU runs (Triton tests on
# CUDA tensors, CUDA C++ tests, a quick benchmark), at most 9 minutes on one H100/H200, with GPU_PYTHON
# (the Python of a CUDA build of torch, not .venv's CPU build); one line and success without a GPU.
# `make test-neon`: the kernel check for Arm NEON, cross-compiled and run under qemu (make test runs it
# first, and says so when the cross compiler or qemu is missing).
VENV ?= .venv
PY := $(VENV)/bin/python
BENCH_ARGS ?=
TEST_ARGS ?=
GPU_PYTHON ?= python3

.PHONY: bench test test-neon lint gpu-check build clean

$(VENV)/.requirements-installed: requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

build: $(VENV)/.requirements-installed
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

test: build test-neon
	$(PY) -m pytest $(TEST_ARGS)

# No .venv here: it pins a CPU build of torch. tests/gpu_check.py builds the extension in place itself.
gpu-check:
	$(GPU_PYTHON) tests/gpu_check.py

test-neon:
	python3 tests/native/run_check.py neon

# ruff (lint and format) for Python, clang-format for C++ and CUDA; configured in pyproject.toml and .clang-format.
lint: $(VENV)/.requirements-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run -Werror $$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'tests/native/*.cpp' 'tests/native/*.h')

bench: build
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info dmup_kernels/*.so
