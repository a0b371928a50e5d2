#!/usr/bin/env bash
# Pack what scripts/gpu_check.sh needs on the lent GPU machine, which has CUDA torch but no cargo,
# no registries and (maybe) no OpenMPI: the release binary, and a relocatable OpenMPI runtime
# (mpirun, its plugins, help files and every shared library they and the binary need that is
# not glibc's or libtorch's). Output: .gpu/ (git-ignored); carry it: carry: [".gpu"].
#
#   here:   cargo build --release && bash scripts/gpu_bundle.sh
#   device: bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.gpu
rm -rf "$OUT"
mkdir -p "$OUT/bin" "$OUT/lib" "$OUT/ompi/bin" "$OUT/ompi/share"
cp target/release/xrayglm "$OUT/bin/"
PKGLIB=$(ompi_info --path pkglibdir --parsable 2>/dev/null | sed 's/.*://')
PREFIX=$(ompi_info --path prefix --parsable 2>/dev/null | sed 's/.*://')
REL=${PKGLIB#"$PREFIX"/}
mkdir -p "$OUT/ompi/$REL"
cp -L "$(readlink -f "$(command -v orterun)")" "$OUT/ompi/bin/mpirun"
cp -L "$(command -v orted)" "$OUT/ompi/bin/" 2>/dev/null || true
# Plugins, minus the fabric ones that pull large libraries a single node does not need.
for p in "$PKGLIB"/*.so; do
  case "$(basename "$p")" in
    *ucx*|*ofi*|*psm*|*openib*|*uct*|*verbs*|*portals*|*cuda*) continue ;;
  esac
  cp -L "$p" "$OUT/ompi/$REL/"
done
cp -rL "$PREFIX/share/openmpi" "$OUT/ompi/share/" 2>/dev/null || true
# PMIx and hwloc load plugins from their own compiled-in folders; gpu_check.sh points them here.
mkdir -p "$OUT/pmix" "$OUT/hwloc"
PMIX_DIR=$(dirname "$(ls /usr/lib/x86_64-linux-gnu/pmix2/lib/pmix/*.so 2>/dev/null | head -n 1)" 2>/dev/null || true)
[ -n "$PMIX_DIR" ] && cp -L "$PMIX_DIR"/*.so "$OUT/pmix/"
for p in /usr/lib/x86_64-linux-gnu/hwloc/hwloc_pci.so; do
  [ -e "$p" ] && cp -L "$p" "$OUT/hwloc/"
done
# The shared-library closure, minus glibc, libtorch and the CUDA/NCCL that torch brings.
skip='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|librt\.|libpthread\.|libutil\.|libstdc\+\+|libgcc_s|libtorch|libc10|libcuda|libcudart|libnccl|libgomp|libcupti|libnvrtc|libnvToolsExt)'
for f in "$OUT/bin/xrayglm" "$OUT/ompi/bin/"* "$OUT/ompi/$REL/"*.so "$OUT/pmix/"*.so "$OUT/hwloc/"*.so; do
  ldd "$f" 2>/dev/null | awk '/=> \//{print $1" "$3}' | while read -r name path; do
    [[ $name =~ $skip ]] && continue
    [ -e "$OUT/lib/$name" ] || cp -L "$path" "$OUT/lib/$name"
  done
done
# The tokenizer for the training check (found as in tests: $XRAYGLM_TOKENIZER, ../shared).
for t in "${XRAYGLM_TOKENIZER:-}" checkpoints/tokenizer/ice_text.model ../shared/reference/tokenizer/ice_text.model; do
  [ -n "$t" ] && [ -f "$t" ] && cp "$t" "$OUT/ice_text.model" && break
done
# OpenI-zh reports for step 5d (the real report length mix; films are synthetic).
for r in "${XRAYGLM_REPORTS:-}" ../shared/data/Xray/openi-zh.json; do
  [ -n "$r" ] && [ -f "$r" ] && cp "$r" "$OUT/openi-zh.json" && break
done
# The original (SwissArmyTransformer 0.3.6 and dill, pure Python) for gpu_check.sh step 7; the GPU
# image has torch, safetensors and transformers.
SITE=$(ls -d /opt/xrayglm/fixtures-venv/lib/python3*/site-packages 2>/dev/null | head -n 1)
if [ -n "$SITE" ] && [ -d "$SITE/sat" ]; then
  mkdir -p "$OUT/py"
  cp -r "$SITE/sat" "$SITE/dill" "$OUT/py/"
  find "$OUT/py" -name __pycache__ -prune -exec rm -rf {} +
fi
du -sh "$OUT"
echo "bundle ready: carry [\".gpu\"] and run: bash scripts/gpu_check.sh"
