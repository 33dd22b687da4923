#!/usr/bin/env bash
# One checkpoint of the default experiment scored under the clean protocol and every paper's
# preset, on the embedded shapes set; prints the side-by-side table of tasks.report --compare.
#
#   bash benchmarks/protocols.sh [OUT_DIR] [extra fit options...]
#
# HSNet's 400 x 400 canvas is meant for PASCAL-size images; on the 96 px shapes set it is set to
# the training size (listed as overridden in its results file).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/protocols}
shift || true
export WANDB_MODE=${WANDB_MODE:-offline}
logger=(--trainer.logger.init_args.save_dir "$out/runs")
python -m tasks.segment fit "${logger[@]}" "$@"
checkpoint=$(find "$out/runs" -name 'best-*.ckpt' | sort | tail -n 1)
for protocol in clean pfenet asgnet hsnet bam; do
    extra=()
    [[ $protocol == hsnet ]] && extra=(--data.eval_size 96)
    python -m tasks.segment test "${logger[@]}" --ckpt_path "$checkpoint" \
        --data.protocol "$protocol" "${extra[@]}" --results.output_dir "$out/results"
done
python -m tasks.report "$out/results" --compare --markdown "$out/compare.md"
python -m tasks.report "$out/results" --markdown "$out/table.md"
