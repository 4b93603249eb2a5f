# Two entry points: `make demo` and `make test`. Both work from nothing but the system Python.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.memprof-deps
BUILT  := $(VENV)/.memprof-built
# Test-only: jsdom runs the HTML report's script headless (tests/report/test_report_js.py,
# which skips with its reason when node or jsdom is missing).
JSDOM  := tests/report/js/node_modules/jsdom/package.json
SOURCES := pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h) \
           $(shell find profiler tritonkernels -name '*.py' 2>/dev/null)

.PHONY: demo test install clean

demo: $(BUILT)
	$(VENV)/bin/memprof demo

test: $(BUILT) $(JSDOM)
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; fi; exit $$rc

install: $(BUILT)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build that lies on this machine's disk, so that nothing
# later (triton, our own requirement) can make pip fetch a multi-GB CUDA build.
$(DEPS): $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "triton>=3.0" "numpy>=1.24" "rich>=13" "nvidia-ml-py>=12" \
	    "pybind11>=2.12" "scikit-build-core>=0.10" "pytest>=7" cmake ninja \
	    "transformers>=4.40" "peft>=0.10" "accelerate>=0.26" "lightning>=2.0"
	touch $@

# Rebuilds (incrementally, in build/) only when a source or a Python file list changed.
$(BUILT): $(DEPS) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

$(JSDOM): tests/report/js/package.json tests/report/js/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	    { npm ci --prefix tests/report/js --no-audit --no-fund --loglevel=error && touch $@; } \
	    || echo "npm ci failed: the HTML report's script test will be skipped"; \
	else echo "npm not found: the HTML report's script test will be skipped"; fi

clean:
	rm -rf build $(VENV) tests/report/js/node_modules
