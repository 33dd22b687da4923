#!/usr/bin/env bash
# Every benchmark on CUDA at the issue's settings, in one invocation; Markdown tables on stdout,
# each under the header line that names the device, torch version and settings:
#
#   bash benchmarks/gpu_suite.sh 2>&1 | tee gpu_suite.log
#
# segment: ResNet-50 and ResNet-101 (deep stem, OS 8), every head, fp32 / bf16+cl / compiled,
# 473 px, batch 8; HSNet's recipe (torchvision ResNet-50 at OS 32, 400 px, batch 20); memory: fine-tuned ResNet-101 at 473, batch 8, with and without gradient
# checkpointing; loader against step (the default experiment; the PFENet head on PASCAL-sized
# JPEGs, CPU and GPU augmentation); the loaders against PFENet's; DDP over 1 and all GPUs; the
# backbone against torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"

run() {
    echo
    echo "## python -m $*"
    python -m "$@"
}

run benchmarks.segment --device cuda --size 473 --batch 8 \
    --backbones resnet50_deep_os8 resnet101_deep_os8 --heads prototype asgnet pfenet hsnet \
    --modes fp32 bf16+cl bf16+cl+compile
run benchmarks.segment --device cuda --size 400 --batch 20 --backbones resnet50 --heads hsnet \
    --modes fp32 bf16+cl bf16+cl+compile
run benchmarks.memory --device cuda --backbone resnet101_deep_os8 --size 473 --batch 8
run benchmarks.loader_vs_step --device cuda --workers 0 1 2 4
# issue 19: the PFENet head at 473 px (frozen ResNet-50, bf16+channels_last) fed by live loaders
# of PASCAL-sized JPEGs, augmented by the workers and on the GPU; the loaders against PFENet's
pascal_like="$(mktemp -d)"
run benchmarks.loader_vs_step --device cuda --dataset pascal-like --root "$pascal_like" \
    --protocol pfenet --backbone resnet50_deep_os8 --head pfenet --bf16 --workers 0 4 8 15
run benchmarks.loader_vs_step --device cuda --dataset pascal-like --root "$pascal_like" \
    --protocol pfenet --backbone resnet50_deep_os8 --head pfenet --bf16 --workers 2 4 \
    --augment-on gpu
run benchmarks.loader_vs_official --root "$pascal_like" --shots 1 5
run benchmarks.ddp --device cuda --sync-batchnorm
run benchmarks.backbone --device cuda --arch resnet101 --output-stride 8 --size 473 --batch 8
# issue 24: every head against its official model (OFFICIAL_ROOT: a folder holding checkouts of
# PFENet, ASGNet and hsnet; BENCHMARKS.md "Against the official models"); skipped without it
if [ -n "${OFFICIAL_ROOT:-}" ]; then
    run benchmarks.vs_official --official-root "$OFFICIAL_ROOT" --device cuda --shots 1 5
fi
