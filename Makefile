# medcare-kernels: `make test` and `make demo` set up .venv on first use, then run.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
STAMP := $(VENV)/.installed

.PHONY: test demo bench bench-suite venv clean triton-compile-check

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip "setuptools>=64" wheel
	$(PYTHON) -m pip install -q torch==$(TORCH_VERSION)
	$(PYTHON) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

## The whole test suite (CPU; GPU-marked tests skip without CUDA).
test: $(STAMP)
	$(PYTHON) -m pytest tests

## The main job: for now, the MoLoRA layer benchmark table on this machine.
demo: $(STAMP)
	$(PYTHON) -m benchmarks

## The benchmark table with the torch backend's formulations, as JSON and a plot under benchmarks/results/.
bench: $(STAMP)
	mkdir -p benchmarks/results
	$(PYTHON) -m benchmarks --formulations --json benchmarks/results/cpu.json --plot benchmarks/results/cpu.png

## pytest-benchmark suites (statistics, comparison between runs).
bench-suite: $(STAMP)
	$(PYTHON) -m pytest benchmarks --benchmark-only

## Compile every Triton kernel and autotune config to sm_90 and sm_80 cubins (no GPU needed; minutes).
triton-compile-check: $(STAMP)
	env -u TRITON_INTERPRET $(PYTHON) -m medcare_kernels.triton._compile_check --arch 90 80

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .benchmarks
