#!/usr/bin/env bash
# Forward time on the `small` preset: xrayglm vs the original SwissArmyTransformer 0.3.6, same
# machine, same run, same thread count. Needs the fixtures venv (scripts/fixtures_venv.sh) with
# SwissArmyTransformer==0.3.6 installed as make_model_fixtures.py describes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${XRAYGLM_FIXTURES_PY:-/opt/xrayglm/fixtures-venv/bin/python}
THREADS=${THREADS:-$(nproc)}
cargo build --release -q
ours=$(OMP_NUM_THREADS=$THREADS ./target/release/xrayglm bench model --preset small --iters 5)
echo "$ours"
sat=$(THREADS=$THREADS "$PY" scripts/bench_forward_sat.py 2>/dev/null | awk '/^sat_ms/ {print $2}')
echo "  sat 0.3.6 (original)      $sat ms/forward"
sat_arith=$(echo "$ours" | awk '/sat arithmetic/ {print $4}')
fused=$(echo "$ours" | awk '/fused attention/ {print $3}')
python3 -c "print('  ratio ours/original: sat arithmetic %.2f, fused %.2f (lower is faster)' % ($sat_arith/$sat, $fused/$sat))"
