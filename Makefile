# One command per job; each sets itself up from nothing (virtual environment, torch, the C++
# extension build) and is a no-op for the parts already done.
#
#   make test    the test suite (what CI runs, via .ci/run)
#   make demo    standard vs J-SIGR on the embedded digits data: accuracy, PGD, pictures, timings
#   make bench   the benchmarks; results land in bench/results/
#
# TORCH_SPEC picks the torch to install. On the CPU machines of this project `torch==2.13.0`
# resolves to a local CPU build; on a GPU box set e.g. TORCH_SPEC="torch" (or keep an existing
# torch: the install is skipped when the venv already imports one).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.jsigr-installed
EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.h)

.PHONY: all setup test test-fast demo bench clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) setup.py pyproject.toml requirements-dev.txt $(EXT_SOURCES)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-build-isolation -e .
	$(PY) -c "import jsigr_fast, torch; print('jsigr_fast', jsigr_fast.__version__, '| torch', torch.__version__, '| compiled ops:', jsigr_fast.extension_loaded())"
	touch $@

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m jsigr_fast demo --out out/demo

bench: $(STAMP)
	$(PY) bench/bench_step.py --out bench/results
	$(PY) bench/bench_epoch.py --preset cpu --out bench/results

clean:
	rm -rf build *.egg-info jsigr_fast/_C*.so out .pytest_cache .benchmarks
