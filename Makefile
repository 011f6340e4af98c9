# `make bench`: the main job (benchmarks with their parity checks). `make test`: the test suite.
# Both create .venv with the pinned requirements if it is missing and (re)build the extension.
VENV ?= .venv
PY := $(VENV)/bin/python
BENCH_ARGS ?=
TEST_ARGS ?=

.PHONY: bench test build clean

$(VENV)/.requirements-installed: requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

build: $(VENV)/.requirements-installed
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest $(TEST_ARGS)

bench: build
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info dmup_kernels/*.so
