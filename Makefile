# Set-up and entry points. `make test` and `make quickstart` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
CONSTRAINTS := $(VENV)/constraints.txt

.PHONY: setup test quickstart clean

setup: $(VENV)/.installed

# torch goes in first, and only where the environment has none, so a cluster's CUDA build is kept;
# every later pip call is pinned to the installed torch through a constraints file.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(CONSTRAINTS)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	touch $@

# DeepSpeed compiles a small CPU op on first use: keep it in the workspace
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q

quickstart: setup
	$(PY) -m pretrain.quickstart

clean:
	rm -rf $(VENV) build *.egg-info
