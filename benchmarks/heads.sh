#!/usr/bin/env bash
# The default experiment (embedded shapes set, fold 0, 1-shot, ResNet-18 at output stride 8,
# clean protocol) trained once per head, each scored on the same 1000 test episodes; prints the
# heads' table of tasks.report. BAM first trains its base learner (python -m tasks.semantic fit,
# the embedded set's fold 0 base classes on the same encoder), then the meta learner on it.
#
#   bash benchmarks/heads.sh [OUT_DIR] [HEAD...]   (heads: prototype asgnet pfenet hsnet bam dcama)
#   BACKBONE=configs/backbones/<file>.yaml bash benchmarks/heads.sh ...   (another encoder)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/heads}
shift || true
heads=("$@")
[[ ${#heads[@]} -gt 0 ]] || heads=(prototype asgnet pfenet hsnet bam dcama)
encoder=()
[[ -z ${BACKBONE:-} ]] || encoder=(--model.backbone "$BACKBONE")
export WANDB_MODE=${WANDB_MODE:-offline}
declare -A class=([prototype]=PrototypeHead [asgnet]=ASGNetHead [pfenet]=PFENetHead
                  [hsnet]=HSNetHead [bam]=BAMHead [dcama]=DCAMAHead)
for head in "${heads[@]}"; do
    runs="$out/$head/runs"
    options=()
    if [[ $head == bam ]]; then
        start=$(date +%s)
        python -m tasks.semantic fit --trainer.logger.init_args.save_dir "$out/bam/base" \
            "${encoder[@]}"
        echo "bam base learner fit: $(($(date +%s) - start)) s" | tee -a "$out/times.txt"
        base=$(find "$out/bam/base" -name 'best-*.ckpt' | sort | tail -n 1)
        python -m tasks.semantic test --trainer.logger.init_args.save_dir "$out/bam/base" \
            --ckpt_path "$base" | tee "$out/bam/base_test.txt"
        options=(--model.head.init_args.base_learner "$base")
    fi
    start=$(date +%s)
    python -m tasks.segment fit --trainer.logger.init_args.save_dir "$runs" \
        --model.head "tasks.heads.${class[$head]}" "${encoder[@]}" "${options[@]}"
    echo "$head fit: $(($(date +%s) - start)) s" | tee -a "$out/times.txt"
    checkpoint=$(find "$runs" -name 'best-*.ckpt' | sort | tail -n 1)
    python -m tasks.segment test --trainer.logger.init_args.save_dir "$runs" \
        --ckpt_path "$checkpoint" --results.output_dir "$out/results/$head"
done
python -m tasks.report "$out/results" --markdown "$out/table.md"
cat "$out/table.md"
