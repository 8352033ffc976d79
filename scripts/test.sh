#!/usr/bin/env bash
# The test-suite, from nothing: sets up .venv and the extension (scripts/env.sh), then runs pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k norm -x).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
start=$SECONDS
"$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
echo "[ckpt_ops test] test-suite wall time: $((SECONDS - start)) s" >&2
