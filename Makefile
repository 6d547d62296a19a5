# The two README commands. Each creates (or reuses) .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are installed first at these versions (they lie on this machine's disk; on
# other machines pip downloads them). Override: make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) tools/demo.py

test: install
	$(PY) -m ruff check torchreid_attrimeter tools tests setup.py
	$(PY) -m pytest -q tests

lint: install
	$(PY) -m ruff check torchreid_attrimeter tools tests setup.py
