# Two commands do all the set-up (see README.md): `make demo` and `make test`.
# Both create .venv at the repository root if it is missing and (re)install when pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lab bench gpu-wheels gpu-check install clean-venv

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else "Python 3.11 is needed; found " + sys.version.split()[0] + " at $(PYTHON) (set PYTHON=/path/to/python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Build (or verify) the built-in demo cohort, then execute every numbered notebook in order on the demo
# preset; executed copies and results under results/.
demo: $(STAMP)
	$(BIN)/python -m lib.data.demo --size demo --ensure
	$(BIN)/python -m lib.pipeline --preset demo

# The CI gate (.ci/run calls exactly this): unit tests and every notebook on the smoke preset
# (the smoke cohort is built first, in seconds, so that the notebooks have data to work on).
test: $(STAMP)
	$(BIN)/python -m lib.data.demo --size smoke --ensure --quiet
	PRESET=smoke $(BIN)/python -m pytest --nbval-lax tests notebooks

# The quick lane while working: the unit tests without the slow ones (no notebook runs, no browser).
test-fast: $(STAMP)
	$(BIN)/python -m lib.data.demo --size smoke --ensure --quiet
	PRESET=smoke $(BIN)/python -m pytest -m "not slow" tests

# Measured speed and memory (results/benchmarks/<timestamp>.json and README.md); run it on an idle machine.
# Some sections or the extras only: make bench BENCH_ARGS="--only steps attention" (python -m lib.bench --help).
bench: $(STAMP)
	$(BIN)/python -m lib.bench $(BENCH_ARGS)

# The GPU check (lib/gpu_check): here, with PyPI, `make gpu-wheels` fills build/gpu-wheels/ for the GPU box's Python;
# on the GPU box (PyTorch only, no network; build/gpu-wheels copied along) `make gpu-check` installs from it offline,
# runs the training notebooks, DDP, the steps beside MONAI and the Kaggle bundle within 8 minutes, and writes
# results/benchmarks/gpu-<timestamp>.json. It needs no .venv: GPU_PYTHON is the interpreter that has torch.
GPU_PYTHON_VERSION ?= 3.12
GPU_PYTHON ?= python3
gpu-wheels: $(STAMP)
	$(BIN)/python -m lib.gpu_check wheels --python-version $(GPU_PYTHON_VERSION) $(GPU_WHEELS_ARGS)

gpu-check:
	$(GPU_PYTHON) -m lib.gpu_check run $(GPU_CHECK_ARGS)

# JupyterLab on this repository, localhost only, opened on the notebooks folder (the token is printed).
lab: $(STAMP)
	$(BIN)/jupyter lab --ip=127.0.0.1 --ServerApp.root_dir=$(CURDIR) --LabApp.default_url=/lab/tree/notebooks \
		$(if $(filter 0,$(shell id -u)),--allow-root,)

clean-venv:
	rm -rf $(VENV)
