# The two README commands. Each creates (or reuses) .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are installed first at these versions (pip takes them from a local wheel cache
# when there is one, otherwise from the registry). Override: make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install browser

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) tools/demo.py

# The HTML report's tests drive Debian's chromium through Playwright (Playwright's own browser download
# needs network access that these machines lack), so `make test` installs it when it is absent.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the report's browser tests"; \
	    apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	    sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "make test needs chromium for the report's browser tests: run 'sudo apt-get install -y chromium' once (Debian/Ubuntu), then make test again"; \
	    exit 2; \
	  fi; }

test: install browser
	$(PY) -m ruff check torchreid_attrimeter tools tests setup.py
	$(PY) -m pytest -q tests

lint: install
	$(PY) -m ruff check torchreid_attrimeter tools tests setup.py
