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

.PHONY: setup train passkey test clean

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

# Passkey retrieval on CPU in three warm-started stages (~20 minutes on 2 cores; see README):
# copy circuit on digits and letters -> passkey in short documents -> 4096-token sequences split
# over $(NPROC) ranks with striped ring attention. Each stage's run directory is outputs/$(PASSKEY_RUN)-<stage>.
PASSKEY_RUN := passkey-$(shell date +%Y%m%d-%H%M%S)
passkey: setup
	LCTRAIN_RUN_ID=$(PASSKEY_RUN)-1-copy $(PY) -m lctrain.train experiment=cpu_passkey_1_copy $(ARGS)
	LCTRAIN_RUN_ID=$(PASSKEY_RUN)-2-short $(PY) -m lctrain.train experiment=cpu_passkey_2_short \
		trainer.init_from=outputs/$(PASSKEY_RUN)-1-copy $(ARGS)
	LCTRAIN_RUN_ID=$(PASSKEY_RUN)-3-4k $(PY) -m lctrain.launch --nproc-per-node=$(NPROC) -m lctrain.train \
		experiment=cpu_passkey_3_4k cp.size=$(NPROC) trainer.init_from=outputs/$(PASSKEY_RUN)-2-short $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
