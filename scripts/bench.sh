#!/usr/bin/env bash
# The main job, from nothing: sets up .venv and the extension (scripts/env.sh), then runs the
# benchmark of fused checkpointing against the alternatives. Arguments go to `python -m bench`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m bench "$@"
