#!/usr/bin/env bash
# The one prepared GPU check, for the lent GPU machine (device tool): CUDA torch is installed
# there, but no cargo, no registries and maybe no OpenMPI. Build and bundle here, carry the bundle:
#
#   here:   cargo build --release && bash scripts/gpu_bundle.sh      (writes .gpu/, ~23 MB)
#   device: bash scripts/gpu_check.sh                                  (carry: [".gpu"])
#
# It proves, in well under 8 minutes:
#   1. the binary finds libtorch_cuda (CUDA registered despite --as-needed) and torch's NCCL;
#   2. NCCL world size 1: all-reduce and broadcast of CUDA tensors exact, bandwidth;
#   3. MPI, 2 ranks sharing the one GPU: the host-staged all-reduce of CUDA tensors exact;
#   4. bf16 matmul throughput vs fp32;
#   5. 20 bf16 LoRA training steps of the real-size VisualGLM-6B (random weights) through the real
#      trainer (NCCL backend, micro-batch 8 padded to 320 tokens, activation checkpointing):
#      samples/s, tokens/s, MFU and HFU from the trainer's FLOP accounting (model::flops: model
#      FLOPs, and with the recomputed forwards), the old 6N figure beside them (6N FLOPs per
#      computed token, N = all parameters), against H100/H200 dense bf16 peak 989 TFLOP/s
#      (override PEAK_TFLOPS), and peak GPU memory;
#   5b. the same 10 steps with int8 ChatGLM layer weights: peak memory;
#   5b'. the same 10 steps with NF4 layer weights (QLoRA, model.quantize=nf4): peak memory (goal:
#      16 GB);
#   5b''. the memory plan (train.checkpoint_layers = "auto", PLAN_BUDGET_GIB, default 40): which
#      layers it recomputes, samples/s, MFU / HFU and peak memory against step 5's full recompute;
#   5c. `bench layer`: the default kernels (fused GELU, one rotary for q and k, LoRA as two thin
#      matmuls, frozen weights outside autograd) against each alternative at the real width;
#   5d. the same model through `bench train` on the OpenI-zh report length mix with xrayglm's
#      defaults (dynamic padding) and the memory plan under the device's free memory:
#      samples/s, report tokens/s, MFU / HFU (the original pads to 320 and recomputes every layer);
#   6. real-size greedy decoding in bf16 with the KV cache: time to first token, tokens/s at batch 1, 8;
#   6b. `bench serve` on the real size in bf16: 1, 4, 8, 16 concurrent API clients against one at a
#      time (continuous batching; the TTFT goal that 2 CPU cores cannot reach);
#   7. the same training and decoding work by the original (scripts/bench_gpu_sat.py) and the ratios
#      (SKIP_SAT=1 skips it when device time is short: its numbers do not depend on xrayglm's code).
set -uo pipefail
cd "$(dirname "$0")/.."
B=${XRAYGLM_BUNDLE:-.gpu}
BIN=$B/bin/xrayglm
[ -x "$BIN" ] || BIN=target/release/xrayglm
TORCH_DIR=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
NCCL_DIR=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__) + "/lib")' 2>/dev/null || true)
export LD_LIBRARY_PATH="$TORCH_DIR/lib${NCCL_DIR:+:$NCCL_DIR}:$PWD/$B/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
MPIRUN=mpirun
# The bundled OpenMPI whenever there is one: a system mpirun would load the bundle's PMIx from
# LD_LIBRARY_PATH and fail (seen on the H200 image: "undefined symbol: PMIx_Info_create").
if [ -x "$B/ompi/bin/mpirun" ]; then
  export OPAL_PREFIX=$PWD/$B/ompi PMIX_MCA_mca_base_component_path=$PWD/$B/pmix HWLOC_PLUGINS_PATH=$PWD/$B/hwloc
  MPIRUN=$B/ompi/bin/mpirun
fi
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
FAIL=0
step() { echo; echo "== $*"; }
step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step "1. xrayglm info"
"$BIN" info | tee /tmp/xrayglm_info.txt
grep -q "cuda available: true" /tmp/xrayglm_info.txt || { echo "FAIL: CUDA not available to xrayglm"; exit 1; }
step "2. NCCL world size 1 (CUDA tensors)"
"$BIN" bench allreduce --backend nccl --device cuda --mib 256 --iters 20 || { echo "FAIL: NCCL all-reduce"; FAIL=1; }
step "3. MPI, 2 ranks on one GPU (host staging)"
"$MPIRUN" -np 2 --oversubscribe --allow-run-as-root "$BIN" bench allreduce --backend mpi --device cuda --mib 64 --iters 5 \
  || { echo "FAIL: MPI 2 ranks on one GPU"; FAIL=1; }
step "4. bf16 vs fp32 matmul"
"$BIN" bench device --device cuda || FAIL=1
step "5. real-size VisualGLM-6B, 20 bf16 LoRA steps, NCCL, micro-batch 8 x 320, activation checkpointing"
TOK=""
for t in checkpoints/tokenizer/ice_text.model shared/reference/tokenizer/ice_text.model ../shared/reference/tokenizer/ice_text.model "$B/ice_text.model"; do
  [ -f "$t" ] && TOK=$t && break
done
[ -n "$TOK" ] || { echo "FAIL: no ice_text.model (scripts/gpu_bundle.sh copies one into the bundle)"; exit 1; }
OUTD=/tmp/xrayglm-gpu
rm -rf "$OUTD"
# Real-size LoRA training through the trainer, peak device memory sampled meanwhile:
# train_real NAME ITERS [--set …]; prints the peak (nvidia-smi, whole device) in MiB.
train_real() {
  local name=$1 iters=$2
  shift 2
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "/tmp/xrayglm_mem_$name.txt" &
  local mon=$!
  timeout 240 "$BIN" finetune --config configs/xrayglm.toml --tokenizer "$TOK" \
    --set 'model.path=""' --set 'model.preset="visualglm-6b"' --set 'model.dtype="bf16"' --set 'model.device="cuda"' \
    --set 'data.path="'$OUTD'/data/Xray/synth-zh.json"' --set 'synthetic.out_dir="'$OUTD'/data"' \
    --set synthetic.count=200 --set synthetic.size=256 --set data.pad_to=320 \
    --set 'train.precision="bf16"' --set train.checkpoint_activations=true --set 'train.backend="nccl"' \
    --set train.train_iters="$iters" --set train.log_interval=5 --set train.save_interval="$iters" \
    --set 'train.out_dir="'$OUTD'"' --set "train.name=\"$name\"" --set train.progress=false \
    --set train.peak_tflops="$PEAK_TFLOPS" "$@"
  local rc=$?
  kill "$mon" 2>/dev/null || true
  echo "peak GPU memory used (nvidia-smi, whole device): $(sort -n "/tmp/xrayglm_mem_$name.txt" | tail -n 1) MiB"
  return $rc
}
train_real gpu-check 20 || { echo "FAIL: real-size training"; FAIL=1; }
python3 - "$OUTD/gpu-check/metrics.jsonl" "$PEAK_TFLOPS" <<'PY' || FAIL=1
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
start = next(r for r in recs if r.get("event") == "start")
steps = [r for r in recs if "samples_per_s" in r][1:]  # first window includes warm-up
n = start["params"]
sps = sum(r["samples_per_s"] for r in steps) / len(steps)
tok = sps * 320  # padded to 320: every position is computed
useful = sum(r["tokens_per_s"] for r in steps) / len(steps)
mfu = tok * 6 * n / (float(sys.argv[2]) * 1e12)
acc = {k: sum(r[k] for r in steps) / len(steps) for k in ("mfu", "hfu", "model_tflops_per_s", "hardware_tflops_per_s")}
json.dump({"samples_per_s": sps, "mfu6": mfu, **acc}, open("/tmp/xrayglm_train.json", "w"))
print(f"params {n/1e9:.3f}B (trainable {start['trainable_params']/1e6:.2f}M), backend {start['backend']}")
print(f"steady state: {sps:.2f} samples/s, {tok:.0f} tokens/s computed ({useful:.0f} target tokens/s)")
print(f"MFU {100*acc['mfu']:.1f}% ({acc['model_tflops_per_s']:.0f} TFLOP/s of model FLOPs), HFU {100*acc['hfu']:.1f}% ({acc['hardware_tflops_per_s']:.0f} TFLOP/s with the recomputed forwards): the trainer's accounting (model::flops)")
print(f"old figure, MFU (6N per computed token, recompute): {100*mfu:.1f}%  (4N: {100*mfu*4/6:.1f}%)")
print("losses:", [round(r["loss"], 4) for r in recs if "loss" in r])
print(f"trainer's peak_gpu_used_mib (cudaMemGetInfo at each log line): {max(r.get('peak_gpu_used_mib', 0) for r in recs):.0f} MiB")
PY
step "5b. the same with int8 ChatGLM layer weights (model.quantize=int8): peak memory (goal: fits in 24 GB)"
train_real gpu-check-int8 10 --set 'model.quantize="int8"' || { echo "FAIL: int8 training"; FAIL=1; }
step "5b'. the same with NF4 ChatGLM layer weights (model.quantize=nf4, QLoRA): peak memory (goal: fits in 16 GB)"
train_real gpu-check-nf4 10 --set 'model.quantize="nf4"' || { echo "FAIL: nf4 training"; FAIL=1; }
step "5b''. the memory plan: checkpoint_layers=auto under ${PLAN_BUDGET_GIB:-40} GiB (against step 5's every layer recomputed)"
train_real gpu-check-plan 20 --set 'train.checkpoint_layers="auto"' --set train.memory_budget_gib="${PLAN_BUDGET_GIB:-40}" \
  || { echo "FAIL: training under the memory plan"; FAIL=1; }
python3 - "$OUTD/gpu-check-plan/metrics.jsonl" <<'PY' || FAIL=1
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
plan = next(r for r in recs if r.get("event") == "memory_plan")
steps = [r for r in recs if "samples_per_s" in r][1:]
sps = sum(r["samples_per_s"] for r in steps) / len(steps)
mfu = sum(r["mfu"] for r in steps) / len(steps)
hfu = sum(r["hfu"] for r in steps) / len(steps)
ours = json.load(open("/tmp/xrayglm_train.json"))
print(f"plan: recompute {plan['recompute']} of {plan['layers']} layers (base {plan['base_mib']:.0f} MiB, {plan['per_layer_mib']:.0f} MiB a kept layer, predicted {plan['predicted_mib']:.0f} of {plan['budget_mib']:.0f} MiB)")
print(f"{sps:.2f} samples/s = {sps / ours['samples_per_s']:.2f}x step 5's every layer recomputed; MFU {100*mfu:.1f}% HFU {100*hfu:.1f}%")
PY
step "5c. kernel choices at the real width: 4 ChatGLM layers, bf16, micro-batch 8 x 320, checkpointing"
timeout 120 "$BIN" bench layer --device cuda --dtype bf16 --layers 4 --batch 8 --seq 320 --steps 5 \
  || { echo "FAIL: layer bench"; FAIL=1; }
step "5d. real-size training on the OpenI-zh report length mix, xrayglm's defaults (dynamic padding), the memory plan, bf16, micro-batch 8"
rm -f /tmp/xrayglm_mix.txt
if [ -f "$B/openi-zh.json" ]; then
  set -o pipefail
  timeout 240 "$BIN" bench train --preset visualglm-6b --batch 8 --steps 14 --warm 4 --films 64 \
    --reports "$B/openi-zh.json" --tokenizer "$TOK" \
    --set 'model.device="cuda"' --set 'model.dtype="bf16"' --set 'train.precision="bf16"' \
    --set 'train.checkpoint_layers="auto"' --set train.peak_tflops="$PEAK_TFLOPS" \
    --set 'train.backend="nccl"' | tee /tmp/xrayglm_mix.txt \
    || { echo "FAIL: real-size training on the OpenI-zh mix"; FAIL=1; }
  set +o pipefail
else
  echo "skipped: no openi-zh.json in the bundle (scripts/gpu_bundle.sh copies ../shared/data/Xray/openi-zh.json)"
fi
step "6. real-size VisualGLM-6B greedy decoding, bf16, KV cache (random weights)"
set -o pipefail
timeout 150 "$BIN" bench generate --preset visualglm-6b --dtype bf16 --device cuda --new_tokens 64 | tee /tmp/xrayglm_gen.txt \
  || { echo "FAIL: real-size decoding"; FAIL=1; }
set +o pipefail
step "6b. the API server (continuous batching), real size, bf16: 1, 4, 8, 16 clients vs one at a time"
timeout 200 "$BIN" bench serve --preset visualglm-6b --dtype bf16 --device cuda --new_tokens 64 --tokenizer "$TOK" \
  || { echo "FAIL: bench serve"; FAIL=1; }
step "7. the original (SwissArmyTransformer 0.3.6) on the same GPU: same training and decoding work"
if [ "${SKIP_SAT:-0}" = 1 ]; then
  echo "skipped (SKIP_SAT=1): the original's numbers do not change with xrayglm's code; see README"
elif [ -d "$B/py/sat" ]; then
  env -u LD_LIBRARY_PATH PYTHONPATH="$PWD/$B/py" PYTHONUNBUFFERED=1 NEW=64 timeout 240 python3 scripts/bench_gpu_sat.py 2>/tmp/xrayglm_sat.err \
    | tee /tmp/xrayglm_sat.txt || { echo "FAIL: the original's benchmark"; tail -n 20 /tmp/xrayglm_sat.err; FAIL=1; }
  python3 - <<'PY' || FAIL=1
import json, os, re
sat = dict(l.split() for l in open("/tmp/xrayglm_sat.txt") if l.startswith(("sat_", "torch_")))
ours = json.load(open("/tmp/xrayglm_train.json"))
gen = open("/tmp/xrayglm_gen.txt").read()
num = lambda pat: float(re.search(pat + r"\s+xrayglm\s+([0-9.]+)", gen).group(1))
rows = [("training samples/s", ours["samples_per_s"], float(sat["sat_train_samples_per_s"]), True),
        ("time to first token ms", num("time to first token"), float(sat["sat_ttft_ms"]), False),
        ("decoding batch 1 tokens/s", num("decoding, batch 1"), float(sat["sat_b1_tps"]), True),
        ("decoding batch 8 tokens/s", num("decoding, batch 8"), float(sat["sat_b8_tps"]), True)]
mix = open("/tmp/xrayglm_mix.txt").read() if os.path.exists("/tmp/xrayglm_mix.txt") else ""
m = re.search(r"^\s*xrayglm\s+([0-9.]+) samples/s", mix, re.M)
if m:
    rows.insert(1, ("training, OpenI-zh mix (dyn.)", float(m.group(1)), float(sat["sat_train_samples_per_s"]), True))
for name, o, s, hi in rows:
    print(f"  {name:28s} xrayglm {o:10.2f}  original {s:10.2f}  ratio {(o / s if hi else s / o):.2f}x")
print(f"  original's peak training memory (torch allocated): {float(sat.get('sat_train_peak_mib', 'nan')):.0f} MiB")
print(f"  PyTorch eager, one tiny CUDA op: {float(sat['torch_eager_us_per_op']):.1f} us")
PY
else
  echo "skipped: no SwissArmyTransformer in the bundle (scripts/gpu_bundle.sh copies it from /opt/xrayglm/fixtures-venv)"
fi
step "done: $([ $FAIL = 0 ] && echo ALL PASSED || echo SOME CHECKS FAILED)"
exit $FAIL
