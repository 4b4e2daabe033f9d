# Two commands for a fresh machine (see README.md):
#   make demo   sets up .venv and classifies the bundled banking example
#   make test   sets up .venv and runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench

# torch==2.13.0 is the CPU build on this machine's local wheel folder; installing it first keeps pip from
# resolving an unpinned torch to a multi-GB CUDA build when sentence-transformers asks for one.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/classify_file.py examples/banking/task.yaml examples/banking/messages.jsonl

test: install
	$(PY) -m pytest
