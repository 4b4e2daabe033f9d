# Two commands for a fresh machine (see README.md):
#   make demo   sets up .venv and classifies the bundled banking example
#   make test   sets up .venv and .venv-vllm (and chromium, for the /docs test) and runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast

# llama-cpp-python compiles from source: tools/install_llama_cpp.sh builds it once per machine for the CPU's own
# instruction sets (never AMX, whose kernels crash in these VMs; AVX-512 only where the CPU has it) and keeps the wheel.
#
# torch==2.13.0 is the CPU build on this machine's local wheel folder; installing it first keeps pip from
# resolving an unpinned torch to a multi-GB CUDA build when sentence-transformers asks for one.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	bash tools/install_llama_cpp.sh $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/classify_file.py examples/banking/task.yaml examples/banking/messages.jsonl

# The vLLM engine's tests talk to a real vLLM server, which lives in its own environment (.venv-vllm); the /docs
# test loads the page in a real headless browser (Debian's chromium).
test: install
	bash tools/vllm_server.sh setup
	bash tools/install_chromium.sh
	$(PY) -m pytest

# The fast layer for a developer's own loop: no LLM, no server, no killed processes (tests marked slow are skipped).
test-fast: install
	$(PY) -m pytest -m "not slow"
