#!/usr/bin/env bash
# The one prepared GPU check, for the lent GPU machine (device tool). It has torch 2.11.0+cu130
# preinstalled but no cargo and no registries: build here, carry the binary.
#
#   here:   cargo build --release
#   device: bash scripts/gpu_check.sh        (with carry: ["target/release/xrayglm"])
#
# What it proves: the binary finds libtorch_cuda (CUDA registered despite --as-needed), bf16 vs
# fp32 matmul throughput, LoRA training steps (bf16 frozen weights, fp32 LoRA + AdamW, fused
# attention) of the real-size VisualGLM-6B with random weights at XrayGLM's micro-batch (8 × 320),
# and peak GPU memory. NCCL (world size 1) joins when data-parallel training lands (issue 5).
set -euo pipefail
BIN=${XRAYGLM_BIN:-target/release/xrayglm}
TORCH_DIR=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
export LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== torch at $TORCH_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
echo "== xrayglm info"
"$BIN" info | tee /tmp/xrayglm_info.txt
grep -q "cuda available: true" /tmp/xrayglm_info.txt || { echo "FAIL: CUDA not available to xrayglm"; exit 1; }
echo "== bench device"
"$BIN" bench device --device cuda
echo "== real-size VisualGLM-6B LoRA training steps, bf16 (peak memory sampled by nvidia-smi every 100 ms)"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/xrayglm_mem.txt &
MON=$!
"$BIN" bench step --preset visualglm-6b --device cuda --dtype bf16 --batch 8 --seq 320 --steps 5
kill "$MON" 2>/dev/null || true
echo "peak GPU memory used: $(sort -n /tmp/xrayglm_mem.txt | tail -n 1) MiB"
echo "== real-size forward (fp32 weights): sat arithmetic vs fused attention"
"$BIN" bench model --preset visualglm-6b --device cuda --batch 8 --seq 320 --iters 3
echo "== bench data (CPU side of the machine)"
"$BIN" bench data --images 400
