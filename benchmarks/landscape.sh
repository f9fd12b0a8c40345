#!/bin/sh
# Loss landscapes of ViT-Tiny (last attention block, qkv+proj weight scales) and
# EfficientNet-Lite0 (one conv layer of the last MBConv block), both W4A8, 9x9 grid, +-10 %.
set -e
export OMP_NUM_THREADS=1 EVOLQ_THREADS=1
PY=${PY:-.venv/bin/python}
$PY -m evolq landscape --model vit_tiny_patch16_224 --w-bits 4 --a-bits 8 --block 11 --layer attn-weights \
    --grid 9 --radius 0.1 --calib-size 64 --limit 32 --infonce-batch 64 --out benchmarks/results/landscape_vit_tiny_w4a8
$PY -m evolq landscape --model tf_efficientnet_lite0 --w-bits 4 --a-bits 8 --block blocks.6.0 --layer conv_pwl \
    --grid 9 --radius 0.1 --calib-size 64 --limit 32 --infonce-batch 64 --out benchmarks/results/landscape_efficientnet_lite0_w4a8
cp benchmarks/results/landscape_vit_tiny_w4a8.png benchmarks/results/landscape_efficientnet_lite0_w4a8.png docs/figures/
