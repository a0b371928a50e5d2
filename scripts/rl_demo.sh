#!/usr/bin/env bash
# The GRPO / DPO demonstration on the hard synthetic set (docs/rl.md, "The hard synthetic set"):
#  1. fine-tune the tiny preset to a plateau (configs/hard.toml); its best checkpoint is where
#     every arm starts and the reference policy of GRPO and DPO;
#  2. per seed: GRPO (configs/hard-grpo.toml); DPO on pairs the model made itself (rl-pairs,
#     configs/hard-dpo.toml); fine-tuning continued at the same learning rate for GRPO's wall time;
#  3. `xrayglm eval` of the start and every arm's final checkpoint on the fine-tuning run's
#     held-out films, with the image ablation (own vs shuffled films): report.md / report.json.
# Usage: scripts/rl_demo.sh [OUT]   (OUT default: checkpoints; SEEDS="1 2 3", DATA=data/synthetic)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-checkpoints}
DATA=${DATA:-data/synthetic}
SEEDS=${SEEDS:-"1 2 3"}
X=${XRAYGLM:-target/release/xrayglm}
[ -x "$X" ] || cargo build --release
where=(--set "train.out_dir=\"$OUT\"" --set "synthetic.out_dir=\"$DATA\""
       --set "data.path=\"$DATA/Xray/synth-hard-zh.json\"")
start="$OUT/hard/best"
from=(--set "train.init_from=\"$start\"")

# 1. The plateau (kept when it is there).
[ -e "$start" ] || "$X" finetune --config configs/hard.toml "${where[@]}"

arms=()
for s in $SEEDS; do
  # 2a. GRPO, timed.
  t0=$(date +%s)
  "$X" finetune --config configs/hard-grpo.toml "${where[@]}" "${from[@]}" \
    --set "train.name=\"hard-grpo-$s\"" --set "rl.seed=$s" --set "loader.seed=$s"
  secs=$(( $(date +%s) - t0 ))
  # 2b. DPO on self-made pairs (8 reports for each of the first 128 training films, best vs
  #     worst 0.2 apart).
  pairs="$DATA/Xray/synth-hard-zh-pairs-$s.json"
  "$X" rl-pairs --from_pretrained "$start" --samples 8 --margin 0.2 --out "$pairs" \
    --limit "${PAIR_FILMS:-128}" --batch_size 8 \
    --set "rl.seed=$s" --set "rl.max_new_tokens=96"
  "$X" finetune --config configs/hard-dpo.toml "${where[@]}" "${from[@]}" \
    --set "train.name=\"hard-dpo-$s\"" --set "rl.pairs=\"$pairs\"" --set "loader.seed=$s"
  # 2c. The control: fine-tuning continued for GRPO's wall time (at the deadline SIGINT saves
  #     the checkpoint; `timeout` then exits 124).
  rc=0
  timeout -s INT "$secs" "$X" finetune --config configs/hard.toml "${where[@]}" "${from[@]}" \
    --set "train.name=\"hard-sft-$s\"" --set "loader.seed=$s" --set train.train_iters=1000000 \
    --set train.schedule=constant --set train.lr=1e-3 --set train.warmup=0 \
    --set train.eval_generate_interval=0 --set train.best_metric=none || rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 124 ] || exit "$rc"
  arms+=("$OUT/hard-grpo-$s" "$OUT/hard-dpo-$s" "$OUT/hard-sft-$s")
done

# 3. Every arm's last checkpoint and the start, on the held-out films.
"$X" eval --checkpoint "$start" "${arms[@]}" --image_ablation shuffled --no_progress \
  --out "$OUT/rl-demo-eval" > "$OUT/rl-demo-eval.json"
cat "$OUT/rl-demo-eval/report.md"
