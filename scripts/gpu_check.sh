#!/usr/bin/env bash
# The one prepared GPU check, for the lent GPU machine (device tool). It has torch 2.11.0+cu130
# preinstalled but no cargo and no registries: build here, carry the binary.
#
#   here:   cargo build --release
#   device: bash scripts/gpu_check.sh        (with carry: ["target/release/xrayglm"])
#
# What it proves today: the binary finds libtorch_cuda (CUDA registered despite --as-needed),
# CUDA tensors work, bf16 vs fp32 matmul throughput and a bf16 training step at ChatGLM's MLP size,
# peak GPU memory. NCCL (world size 1) and LoRA training of the real-size VisualGLM with random
# weights join this script as the model (issue 3), trainer (issue 4) and NCCL (issue 5) land.
set -euo pipefail
BIN=${XRAYGLM_BIN:-target/release/xrayglm}
TORCH_DIR=$(python3 -c 'import torch, os; print(os.path.dirname(torch.__file__))')
export LD_LIBRARY_PATH="$TORCH_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== torch at $TORCH_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
echo "== xrayglm info"
"$BIN" info | tee /tmp/xrayglm_info.txt
grep -q "cuda available: true" /tmp/xrayglm_info.txt || { echo "FAIL: CUDA not available to xrayglm"; exit 1; }
echo "== bench device (peak memory sampled by nvidia-smi every 100 ms)"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/xrayglm_mem.txt &
MON=$!
"$BIN" bench device --device cuda
kill "$MON" 2>/dev/null || true
echo "peak GPU memory used: $(sort -n /tmp/xrayglm_mem.txt | tail -n 1) MiB"
echo "== bench data (CPU side of the machine)"
"$BIN" bench data --images 400
