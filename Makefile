# Two commands for a fresh machine (see README.md):
#   make demo   sets up .venv and classifies the bundled banking example
#   make test   sets up .venv and .venv-vllm and runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install demo test

# llama-cpp-python compiles from source (5-15 min on 2 cores, once; pip caches the wheel). Not -march=native:
# these machines advertise AMX, and ggml's AMX kernels crash (SIGSEGV in ggml_backend_amx_mul_mat) in this VM,
# so the build names the AVX-512 features explicitly and leaves AMX out. No LLaVA needed.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DLLAVA_BUILD=OFF

# torch==2.13.0 is the CPU build on this machine's local wheel folder; installing it first keeps pip from
# resolving an unpinned torch to a multi-GB CUDA build when sentence-transformers asks for one.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/classify_file.py examples/banking/task.yaml examples/banking/messages.jsonl

# The vLLM engine's tests talk to a real vLLM server, which lives in its own environment (.venv-vllm).
test: install
	bash tools/vllm_server.sh setup
	$(PY) -m pytest
