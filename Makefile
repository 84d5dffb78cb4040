# The two commands the README starts with: `make train` and `make test`.
# Both create .venv and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NPROC ?= 2
# torch goes in first, pinned, so a CPU-only machine never resolves the
# project's `torch>=2.6` (or DeepSpeed's `torch`) to a CUDA build; an existing torch is kept.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup train test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,deepspeed]"
	touch $(STAMP)

# The main job: tiny Llama on built-in long-range recall, each sequence split over
# $(NPROC) >= 2 ranks with striped ring attention (gloo on CPU); rendezvous on 127.0.0.1 only.
train: setup
	$(PY) -m lctrain.launch --nproc-per-node=$(NPROC) -m lctrain.train experiment=cpu_demo \
		cp.size=$(NPROC) $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
