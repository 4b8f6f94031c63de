# medcare-kernels: `make test` and `make demo` set up .venv on first use, then run.
PY ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo

# The CUDA toolkit: the first of $CUDA_HOME, the toolkit of the nvcc on PATH, /usr/local/cuda,
# /usr/local/cuda-* that has bin/nvcc and include/cuda_runtime.h (a wrapper script such as
# /usr/local/bin/nvcc does not make /usr/local a toolkit).
NVCC_ON_PATH := $(shell command -v nvcc 2>/dev/null)
CUDA_TOOLKIT := $(firstword $(foreach d,$(CUDA_HOME) \
                  $(if $(NVCC_ON_PATH),$(patsubst %/bin/nvcc,%,$(realpath $(NVCC_ON_PATH)))) \
                  /usr/local/cuda $(wildcard /usr/local/cuda-*), \
                  $(if $(and $(wildcard $(d)/bin/nvcc),$(wildcard $(d)/include/cuda_runtime.h)),$(d))))
NVCC := $(if $(CUDA_TOOLKIT),$(CUDA_TOOLKIT)/bin/nvcc)
# Parallel compile jobs for the extension (CI has 2 cores); the GPU machine's build uses GPU_MAX_JOBS.
MAX_JOBS ?= 2
GPU_MAX_JOBS ?= 8
EXT_STAMP := build/.cuda-extension
CSRC := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.cuh)

# gpu-check: the venv's python when there is one, else the system's (a bare GPU box, no network).
GPU_PYTHON ?= $(if $(wildcard $(PYTHON)),$(PYTHON),$(PY))
# Where gpu-check writes its results: $OUT when set (the GPU runner collects it), else benchmarks/results.
OUT_DIR ?= $(if $(OUT),$(OUT),benchmarks/results)

.PHONY: test lint demo bench bench-suite venv ext wheel gpu-check clean triton-compile-check

venv: $(STAMP)

# The package installs editable and pure-Python here (MEDCARE_BUILD_CUDA=0); `ext` compiles the
# CUDA extension in place, so a change under csrc/ rebuilds only that (ninja, incremental).
# `make demo` needs only the demo extra (transformers, accelerate, matplotlib); the test and lint tools,
# DeepSpeed and the benchmark comparisons come with the dev extra, on top of it.
$(DEMO_STAMP): pyproject.toml setup.py
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip "setuptools>=64" wheel ninja
	$(PYTHON) -m pip install -q torch==$(TORCH_VERSION)
	MEDCARE_BUILD_CUDA=0 $(PYTHON) -m pip install -q --no-build-isolation -e ".[demo]"
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	MEDCARE_BUILD_CUDA=0 $(PYTHON) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

## The CUDA extension medcare_kernels._C, built in place when nvcc is found (skipped with a message if not).
ext: $(STAMP)
ifeq ($(NVCC),)
	@echo "make: nvcc not found (set CUDA_HOME to a CUDA toolkit): skipping the CUDA extension; its tests skip"
else
	@$(MAKE) --no-print-directory $(EXT_STAMP)
endif

$(EXT_STAMP): $(STAMP) setup.py $(CSRC)
	@mkdir -p build
	@start=$$(date +%s) && \
	CUDA_HOME=$(CUDA_TOOLKIT) PATH="$(abspath $(VENV))/bin:$$PATH" MAX_JOBS=$(MAX_JOBS) MEDCARE_BUILD_CUDA=1 \
	  $(PYTHON) setup.py -q build_ext --inplace && \
	echo "make: CUDA extension built in $$(( $$(date +%s) - start )) s (MAX_JOBS=$(MAX_JOBS), CUDA_HOME=$(CUDA_TOOLKIT))"
	@touch $@

## ruff over the whole tree (rules in pyproject.toml); CI runs it before the tests.
lint: $(STAMP)
	$(PYTHON) -m ruff check .

## The whole test suite (CPU; GPU-marked tests skip without CUDA). Builds the CUDA extension first.
test: ext
	$(PYTHON) -m pytest tests

## A wheel in dist/ with the compiled extension (TORCH_CUDA_ARCH_LIST, default "8.0;9.0+PTX").
wheel: $(STAMP)
	@test -n "$(NVCC)" || { echo "make wheel: nvcc not found: set CUDA_HOME to a CUDA toolkit"; exit 1; }
	CUDA_HOME=$(CUDA_TOOLKIT) PATH="$(abspath $(VENV))/bin:$$PATH" MAX_JOBS=$(MAX_JOBS) MEDCARE_BUILD_CUDA=1 \
	  $(PYTHON) -m pip wheel -q --no-build-isolation --no-deps -w dist .
	@$(PYTHON) -c "import glob, zipfile; w = max(glob.glob('dist/medcare_kernels-*.whl'), key=__import__('os').path.getmtime); \
	  so = [n for n in zipfile.ZipFile(w).namelist() if n.startswith('medcare_kernels/_C')]; \
	  assert so, f'{w} has no compiled extension'; print(f'make wheel: {w} contains {so[0]}')"

## On a GPU machine (no network needed): build in place, run the gpu tests, the GPU benchmarks and
## compute-sanitizer; results (JSON, markdown, logs) in $(OUT_DIR). QUICK=1: the prepared run, every step
## time-boxed, under 8 minutes on an H200 (see benchmarks/gpu_check.sh). DRY_RUN=1: each step in a CPU
## smoke form (what tests/test_gpu_check.py runs).
QUICK ?=
DRY_RUN ?=
gpu-check:
	PYTHON="$(GPU_PYTHON)" OUT_DIR="$(OUT_DIR)" MAX_JOBS=$(GPU_MAX_JOBS) CUDA_HOME="$(CUDA_TOOLKIT)" \
	  QUICK="$(QUICK)" DRY_RUN="$(DRY_RUN)" bash benchmarks/gpu_check.sh

## The main job: both MedCare stages end to end on a tiny model and the embedded data (medcare demo).
demo: $(DEMO_STAMP)
	$(PYTHON) -m medcare demo

## The benchmark table with the torch backend's formulations, as JSON and a plot under benchmarks/results/.
bench: $(STAMP)
	mkdir -p benchmarks/results
	$(PYTHON) -m benchmarks --formulations --json benchmarks/results/cpu.json --plot benchmarks/results/cpu.png

## pytest-benchmark suites (statistics, comparison between runs).
bench-suite: $(STAMP)
	$(PYTHON) -m pytest benchmarks --benchmark-only

## Compile every Triton kernel and autotune config to sm_90 and sm_80 cubins (no GPU needed; minutes).
triton-compile-check: $(STAMP)
	env -u TRITON_INTERPRET $(PYTHON) -m medcare_kernels.backends.triton._compile_check --arch 90 80

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .benchmarks medcare_kernels/_C*.so
