#!/usr/bin/env bash
# Installs what xrayglm needs on a fresh Debian machine; idempotent, and quick when already done.
#
#   bash scripts/setup.sh           # CPU-only libtorch (PyPI torch==2.11.0 without its CUDA deps, ~1.3 GB)
#   bash scripts/setup.sh --cuda    # the full CUDA torch==2.11.0 wheel with its NVIDIA deps (~4.7 GB)
#
# What it installs:
#   * apt: OpenMPI (libopenmpi-dev, openmpi-bin), libclang-dev and pkg-config (for the mpi crate),
#     strace (the durability test watches the fsync / rename order)
#   * for the web demo's browser test: apt chromium + fonts-noto-cjk, Node.js/npm, and
#     playwright-core (npm, no browser download) under $XRAYGLM_PREFIX/node; --no-browser skips them
#   * for the API test: the official `openai` Python client and Prometheus' `prometheus_client`
#     (its text-format parser reads /metrics), pinned, in a venv at $XRAYGLM_PREFIX/openai-venv
#   * libtorch 2.11.0 (tch 0.24) from the PyPI wheel into a venv under $XRAYGLM_PREFIX
#     (default /opt/xrayglm), linked as $XRAYGLM_PREFIX/libtorch. .cargo/config.toml points
#     LIBTORCH there; with another prefix, export LIBTORCH=$XRAYGLM_PREFIX/libtorch.
# Binaries get an RPATH to libtorch (build.rs), so nothing needs LD_LIBRARY_PATH.
set -euo pipefail

PREFIX=${XRAYGLM_PREFIX:-/opt/xrayglm}
TORCH_VERSION=2.11.0
CUDA=0
BROWSER=1
PLAYWRIGHT_VERSION=1.49.1
OPENAI_VERSION=3.60.0
PROMETHEUS_CLIENT_VERSION=0.26.0
for a in "$@"; do
  case "$a" in
    --cuda) CUDA=1 ;;
    --no-browser) BROWSER=0 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $a" >&2; exit 2 ;;
  esac
done

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi

apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

apt_install libopenmpi-dev openmpi-bin libclang-dev pkg-config strace iproute2 slurm-wlm

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install a Rust toolchain (rustup) first" >&2
  exit 1
fi
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  apt_install python3-venv
fi

if [ "$CUDA" = 1 ]; then VENV="$PREFIX/torch-$TORCH_VERSION-cuda"; else VENV="$PREFIX/torch-$TORCH_VERSION-cpu"; fi

torch_dir() { ls -d "$1"/lib/python3*/site-packages/torch 2>/dev/null | head -n 1; }

have_torch() {
  local d
  d=$(torch_dir "$VENV")
  [ -n "$d" ] && grep -q "__version__ = '$TORCH_VERSION" "$d/version.py" 2>/dev/null && [ -f "$d/lib/libtorch_cpu.so" ]
}

if ! have_torch; then
  $SUDO mkdir -p "$PREFIX"
  [ -w "$PREFIX" ] || $SUDO chown "$(id -u):$(id -g)" "$PREFIX"
  tmp="$VENV.partial"
  rm -rf "$tmp"
  echo "setup: installing torch==$TORCH_VERSION into $VENV (one time)"
  python3 -m venv "$tmp"
  if [ "$CUDA" = 1 ]; then
    "$tmp/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION"
  else
    # libtorch_cpu.so itself links libcudart.so.13 and libcupti.so.13 (found via the wheel's RUNPATH).
    "$tmp/bin/pip" install -q --disable-pip-version-check --no-deps "torch==$TORCH_VERSION" \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
  fi
  rm -rf "$VENV"
  mv "$tmp" "$VENV"
  # The venv's scripts carry the old path in their shebangs; only the libraries are used.
fi
ln -sfn "$(torch_dir "$VENV")" "$PREFIX/libtorch"
if [ "$BROWSER" = 1 ]; then
  apt_install chromium fonts-noto-cjk
  command -v npm >/dev/null 2>&1 || apt_install nodejs npm
  if [ ! -f "$PREFIX/node/node_modules/playwright-core/package.json" ] ||
     ! grep -q "\"version\": \"$PLAYWRIGHT_VERSION\"" "$PREFIX/node/node_modules/playwright-core/package.json"; then
    echo "setup: npm install playwright-core@$PLAYWRIGHT_VERSION into $PREFIX/node (one time)"
    mkdir -p "$PREFIX/node"
    [ -f "$PREFIX/node/package.json" ] || echo '{"name": "xrayglm-browser-test", "private": true}' > "$PREFIX/node/package.json"
    (cd "$PREFIX/node" && npm install --silent --no-audit --no-fund "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null)
  fi
fi
# The official OpenAI client, for the API test (tests/openai/check_serve.py).
OPENAI_VENV="$PREFIX/openai-venv"
if ! "$OPENAI_VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  echo "setup: pip install openai==$OPENAI_VERSION into $OPENAI_VENV (one time)"
  $SUDO mkdir -p "$PREFIX"
  [ -w "$PREFIX" ] || $SUDO chown "$(id -u):$(id -g)" "$PREFIX"
  rm -rf "$OPENAI_VENV.partial"
  python3 -m venv "$OPENAI_VENV.partial"
  "$OPENAI_VENV.partial/bin/pip" install -q --disable-pip-version-check "openai==$OPENAI_VERSION"
  rm -rf "$OPENAI_VENV"
  mv "$OPENAI_VENV.partial" "$OPENAI_VENV"
fi
if ! "$OPENAI_VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('prometheus_client') != '$PROMETHEUS_CLIENT_VERSION')" 2>/dev/null; then
  echo "setup: pip install prometheus_client==$PROMETHEUS_CLIENT_VERSION into $OPENAI_VENV (one time)"
  "$OPENAI_VENV/bin/python" -m pip install -q --disable-pip-version-check "prometheus_client==$PROMETHEUS_CLIENT_VERSION"
fi
if [ "$PREFIX" != /opt/xrayglm ] && [ -z "${LIBTORCH:-}" ]; then
  echo "setup: export LIBTORCH=$PREFIX/libtorch before cargo build" >&2
fi
echo "setup: ok (libtorch $TORCH_VERSION at $PREFIX/libtorch -> $(readlink "$PREFIX/libtorch"))"
