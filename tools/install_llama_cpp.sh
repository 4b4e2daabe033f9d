#!/usr/bin/env bash
# Install llama-cpp-python (pinned in pyproject.toml) built for THIS machine's CPU into the given Python.
#
#   tools/install_llama_cpp.sh .venv/bin/python
#
# PyPI ships llama-cpp-python as source only, so it compiles (5-15 min on 2 cores). Two things make that fragile:
# - -march=native (GGML_NATIVE) turns on AMX where the CPU advertises it, and ggml's AMX kernels crash in the VMs
#   these machines run in; so the instruction sets are named one by one, AMX never among them;
# - a wheel built for one CPU dies with "Illegal instruction" on another (AVX-512 on a CPU without it), and pip's
#   wheel cache does not know the build flags. So the wheel is built once per set of flags into
#   ~/.cache/labelcascade/llama-wheels/<flags>/ and installed from there: later installs on the same kind of CPU
#   take seconds, and another kind of CPU gets a build of its own.
set -euo pipefail
PY=${1:?usage: tools/install_llama_cpp.sh PYTHON}
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' "$(dirname "$0")/../pyproject.toml")

flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
has() { [[ " $flags " == *" $1 "* ]] && echo ON || echo OFF; }
ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma)"
ARGS+=" -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni)"
ARGS+=" -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AVX512_VNNI=$(has avx512_vnni)"
ARGS+=" -DGGML_AVX512_BF16=$(has avx512_bf16)"

key=$(echo "$VERSION $ARGS" | sha256sum | cut -c1-16)
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/labelcascade/llama-wheels/$key"
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $VERSION for this CPU ($ARGS); once per machine, 5-15 min" >&2
    mkdir -p "$WHEELS.tmp"
    CMAKE_ARGS="$ARGS" "$PY" -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
        -w "$WHEELS.tmp" "llama-cpp-python==$VERSION"
    rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
fi
"$PY" -m pip install -q --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl
