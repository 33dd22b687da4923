#!/usr/bin/env bash
# The default experiment (embedded shapes set, fold 0, 1-shot, ResNet-18 at output stride 8,
# clean protocol) trained once per head, each scored on the same 1000 test episodes; prints the
# heads' table of tasks.report.
#
#   bash benchmarks/heads.sh [OUT_DIR] [HEAD...]   (heads: prototype asgnet pfenet hsnet)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/heads}
shift || true
heads=("$@")
[[ ${#heads[@]} -gt 0 ]] || heads=(prototype asgnet pfenet hsnet)
export WANDB_MODE=${WANDB_MODE:-offline}
declare -A class=([prototype]=PrototypeHead [asgnet]=ASGNetHead [pfenet]=PFENetHead [hsnet]=HSNetHead)
for head in "${heads[@]}"; do
    runs="$out/$head/runs"
    start=$(date +%s)
    python -m tasks.segment fit --trainer.logger.init_args.save_dir "$runs" \
        --model.head "tasks.heads.${class[$head]}"
    echo "$head fit: $(($(date +%s) - start)) s" | tee -a "$out/times.txt"
    checkpoint=$(find "$runs" -name 'best-*.ckpt' | sort | tail -n 1)
    python -m tasks.segment test --trainer.logger.init_args.save_dir "$runs" \
        --ckpt_path "$checkpoint" --results.output_dir "$out/results/$head"
done
python -m tasks.report "$out/results" --markdown "$out/table.md"
cat "$out/table.md"
