#!/usr/bin/env bash
# Creates .venv/ at the repo root when missing (torch 2.14.1 -- a CUDA build -- with the Triton it
# pins, pytest, ninja, ...) and (re)builds the extension ckpt_ops._C when its sources changed.
# Sourced by scripts/test.sh and scripts/bench.sh; safe to run again (it only redoes what changed).
#
# Knobs: CKPT_OPS_CUDA_ARCHS (default: this machine's GPU, else "8.0+PTX": one arch keeps the
# build short; set e.g. "8.0;9.0;10.0" for a wider one), CKPT_OPS_SKIP_CUDA=1 (CPU-only build),
# PYTHON (interpreter used to create the venv, default python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
TORCH_VERSION="2.14.1"

log() { echo "[ckpt_ops env] $*" >&2; }

if [[ ! -x "$PY" ]] || ! "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  log "creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "is ignored: it is neither" || true
fi
# (Re)install the pinned requirements when requirements-dev.txt changed since the last install.
REQ_STAMP="$VENV/.ckpt_ops_req_stamp"
req_want="$(sha1sum "$ROOT/requirements-dev.txt" | cut -d' ' -f1)"
if [[ ! -f "$REQ_STAMP" || "$(cat "$REQ_STAMP")" != "$req_want" ]]; then
  log "installing requirements-dev.txt (torch $TORCH_VERSION and the Triton it pins, ...)"
  "$PY" -m pip install -q -r "$ROOT/requirements-dev.txt" 2>&1 | grep -v "is ignored: it is neither" || true
  "$PY" -c "import torch, triton, transformers, matplotlib, pytest" || { log "requirements failed to install"; exit 1; }
  echo "$req_want" > "$REQ_STAMP"
  "$PY" -c "import torch, triton; print('[ckpt_ops env] torch', torch.__version__, 'triton', triton.__version__)" >&2
fi

# CUDA sources are built whenever nvcc exists; then a failure to build them is an error, never a
# silent CPU-only package (tests assert the CUDA build with CKPT_OPS_EXPECT_CUDA_BUILD=1).
export CKPT_OPS_EXPECT_EXTENSION=1
if [[ "${CKPT_OPS_SKIP_CUDA:-0}" != "1" ]] && { command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; }; then
  export CKPT_OPS_FORCE_CUDA=1 CKPT_OPS_EXPECT_CUDA_BUILD=1
  if [[ -z "${CKPT_OPS_CUDA_ARCHS:-}" ]]; then
    CKPT_OPS_CUDA_ARCHS="$("$PY" -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (8, 0); print(f'{c[0]}.{c[1]}+PTX')" 2>/dev/null)"
    export CKPT_OPS_CUDA_ARCHS
  fi
else
  export CKPT_OPS_EXPECT_CUDA_BUILD=0
fi

# Rebuild when the C++/CUDA sources, setup.py or the build knobs changed since the last build.
STAMP="$VENV/.ckpt_ops_build_stamp"
want="$(cd "$ROOT" && { find csrc setup.py -type f | sort | xargs sha1sum; env | grep -E '^CKPT_OPS_(CUDA_ARCHS|SKIP_CUDA|FORCE_CUDA)=' | sort; } | sha1sum | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]] || ! ls "$ROOT"/ckpt_ops/_C*.so >/dev/null 2>&1; then
  log "building ckpt_ops._C (archs: ${CKPT_OPS_CUDA_ARCHS:-none}); takes about a minute per .cu file on 2 cores"
  start=$SECONDS
  buildlog="$VENV/.ckpt_ops_build.log"
  if ! (cd "$ROOT" && "$PY" -m pip install --no-build-isolation --no-deps -v -e . >"$buildlog" 2>&1); then
    grep -E "error|Error|ckpt_ops setup" "$buildlog" | tail -40 >&2
    log "extension build failed (full log: $buildlog)"
    exit 1
  fi
  grep "ckpt_ops setup" "$buildlog" >&2 || true
  "$PY" -c "import ckpt_ops._C" || { log "the extension was built but does not import"; exit 1; }
  echo "$want" > "$STAMP"
  log "built in $((SECONDS - start)) s"
fi
"$PY" -c "import ckpt_ops, json; i = ckpt_ops.backend_info()['extension']; print('[ckpt_ops env] extension:', json.dumps(i))" >&2
