#!/usr/bin/env bash
# The Python environment that generates the GRPO / DPO loss fixtures from TRL itself (not needed by
# tests or CI: the fixtures are committed). Lives outside the repo. Prints its python.
set -euo pipefail
VENV=${XRAYGLM_TRL_VENV:-/opt/xrayglm/trl-venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import trl, torch' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 trl==1.16.0
fi
echo "$VENV/bin/python"
