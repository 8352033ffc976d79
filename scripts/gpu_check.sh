#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU: builds ckpt_ops for that GPU, runs the op test-suite on CUDA
# tensors (every op x backend triton/cuda vs the reference, fp16/bf16/fp32) and a short benchmark
# (python -m bench --device cuda: norm, MLP, attention and a block stack at S 2048, every provider, with the
# roofline columns), and writes logs, JUnit XML, JSON lines, PNGs and summary.json under one folder.
#
#   scripts/gpu_check.sh [--out DIR] [--dry-run] [--arch 9.0] [--tests FILES...] [--reps N]
#
# Environment: like scripts/env.sh -- creates .venv (torch from pip, requirements-dev.txt) and builds the
# extension for this GPU's arch -- when a package index is reachable; on a machine that cannot reach one
# (e.g. a lent GPU box with torch preinstalled) it says so and uses the first of $GPU_CHECK_PYTHON, an
# existing .venv, or python3 with a CUDA torch, and builds the extension in place. --dry-run prints that
# choice and the plan (commands, shapes, time limits) as JSON and runs nothing: no GPU, torch or nvcc needed.
# Budget on one H100/H200 (env already created): under 8 minutes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DRY=0
for a in "$@"; do [[ "$a" == "--dry-run" ]] && DRY=1; done
log() { echo "[gpu_check] $*" >&2; }

index_reachable() {
  timeout 30 "${PYTHON:-python3}" -m pip index versions pip --timeout 5 --retries 0 >/dev/null 2>&1
}

EXTRA=()
if [[ -n "${GPU_CHECK_PYTHON:-}" ]]; then
  PY="$GPU_CHECK_PYTHON"; ENV_HOW="GPU_CHECK_PYTHON"
elif [[ "$DRY" == 1 ]]; then
  PY="${PYTHON:-python3}"; ENV_HOW="dry run: would source scripts/env.sh if a package index is reachable, else use .venv or python3"
elif index_reachable; then
  ENV_HOW="scripts/env.sh (.venv, torch from pip, extension built for this GPU)"
  source "$ROOT/scripts/env.sh"
  PY="$ROOT/.venv/bin/python"
  EXTRA+=(--skip-build)  # env.sh just built the extension for this GPU's arch
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY="$ROOT/.venv/bin/python"; ENV_HOW="existing .venv (no package index reachable)"
else
  PY="$(command -v python3)"; ENV_HOW="no package index reachable: using $PY and its preinstalled torch"
fi
log "python: $PY ($ENV_HOW)"
if [[ "$DRY" != 1 ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  log "no CUDA GPU visible to $PY"; exit 2
fi
exec "$PY" "$ROOT/scripts/gpu_check.py" --python "$PY" --env-note "$ENV_HOW" "${EXTRA[@]}" "$@"
