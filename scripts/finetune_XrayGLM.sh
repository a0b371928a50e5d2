#!/usr/bin/env bash
# XrayGLM's finetune_XrayGLM.sh for xrayglm: one trainer process per GPU under MPI.
#
#   NUM_GPUS=4 bash scripts/finetune_XrayGLM.sh                       # one node, 4 GPUs
#   HOSTFILE=hosts NUM_GPUS=8 bash scripts/finetune_XrayGLM.sh        # several nodes (MPI hostfile)
#   CONFIG=configs/demo.toml NUM_GPUS=2 bash scripts/finetune_XrayGLM.sh --set model.device=\"cpu\"  # CPU ranks
#
# Extra arguments go to `xrayglm finetune` (e.g. --set train.train_iters=3000). Under Slurm, run
# `srun -n 4 target/release/xrayglm finetune --config configs/xrayglm.toml` instead: ranks come
# from the MPI runtime / SLURM_* variables.
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS=${NUM_GPUS:-4}
CONFIG=${CONFIG:-configs/xrayglm.toml}
BIN=${XRAYGLM_BIN:-target/release/xrayglm}
[ -x "$BIN" ] || cargo build --release
args=(-np "$NUM_GPUS")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ "$(id -u)" -eq 0 ] && args+=(--allow-run-as-root)
# More ranks than cores is fine for CPU runs; one thread per rank.
args+=(--oversubscribe -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}")
# xrayglm's and NCCL's settings (XRAYGLM_TOKENIZER, NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG,
# ...) and library paths reach every node.
for v in $(env | sed -n 's/^\(\(XRAYGLM\|NCCL\)_[A-Z0-9_]*\)=.*/\1/p'); do args+=(-x "$v"); done
# A node that drops off the network: mpirun and the remote daemons notice it by TCP keepalive on
# their control connections (OpenMPI's default waits 300 s before the first probe) and end the
# job, and a rank stalled in a collective says which rank and host it waited for. Keep the
# detection (time + intvl x probes = 25 s here) under train.dist_timeout_s (30 s by default).
export OMPI_MCA_oob_tcp_keepalive_time=${OMPI_MCA_oob_tcp_keepalive_time:-10}
export OMPI_MCA_oob_tcp_keepalive_intvl=${OMPI_MCA_oob_tcp_keepalive_intvl:-5}
export OMPI_MCA_oob_tcp_keepalive_probes=${OMPI_MCA_oob_tcp_keepalive_probes:-3}
[ -n "${LD_LIBRARY_PATH:-}" ] && args+=(-x LD_LIBRARY_PATH)
exec mpirun "${args[@]}" "$BIN" finetune --config "$CONFIG" "$@"
