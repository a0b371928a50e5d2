#!/usr/bin/env bash
# The Python environment that generates parity fixtures (not needed by tests or CI: the fixtures are
# committed). Lives outside the repo. Full torch (so torchvision imports), Pillow, sentencepiece.
set -euo pipefail
VENV=${XRAYGLM_FIXTURES_VENV:-/opt/xrayglm/fixtures-venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import torchvision, sentencepiece, PIL' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.11.0 torchvision pillow sentencepiece numpy
fi
echo "$VENV/bin/python"
